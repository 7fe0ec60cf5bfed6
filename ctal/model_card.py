"""The model card (README.md) every checkpoint folder carries: what the model is and how it was made.

`model_card(facts)` is pure: the checkpoint store gathers the facts and writes the text. Hugging Face
reads the YAML front matter (library, tags); a person reads the rest.
"""
from __future__ import annotations

import shlex

KINDS = ("pretraining", "fine-tuned")
REQUIRED = ("kind", "data", "tokenizer_hash")
OPTIONAL = ("task", "fusion", "parameters", "step", "epoch", "metrics", "config", "text_normalization",
            "command", "manifest")

_WHAT = {
    "pretraining": ("CTAL text and audio streams with their pretraining heads (masked language modeling on "
                    "the text, masked acoustic modeling on the frames); load it with "
                    "`CTALForPretraining.from_pretrained`, or start a task model from it."),
    "fine-tuned": ("A CTAL model fine-tuned for one task: both streams, the fusion of their pooled vectors "
                   "and a task head; load it with `CTALForSequenceClassification.from_pretrained`."),
}
_AUTO_CLASS = {"pretraining": "AutoModelForPreTraining", "fine-tuned": "AutoModelForSequenceClassification"}


def _cell(value) -> str:
    """One markdown table cell: numbers kept short, pipes and newlines escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        text = f"{value:,}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)]


def model_card(facts: dict) -> str:
    """Markdown for a checkpoint's README.md.

    facts: kind ("pretraining" or "fine-tuned"), data (the data set's path or URI), tokenizer_hash;
    optionally task, fusion, parameters (a count), step and/or epoch, metrics ({name: value}),
    config ({key: value}, the config summary), text_normalization, command (a string or an argv
    list), manifest (the run manifest's file name beside the card). An unknown or missing fact
    raises ValueError naming it.
    """
    missing = [k for k in REQUIRED if facts.get(k) in (None, "")]
    unknown = [k for k in facts if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise ValueError(f"model card facts: missing {missing}, unknown {unknown} "
                         f"(known: {', '.join(REQUIRED + OPTIONAL)})")
    kind = facts["kind"]
    if kind not in KINDS:
        raise ValueError(f"model card facts: kind={kind!r} is not one of {list(KINDS)}")
    title = "CTAL pretraining checkpoint" if kind == "pretraining" else "CTAL fine-tuned checkpoint"
    if facts.get("task"):
        title += f": {facts['task']}"
    tags = ["ctal", "audio", "text", "multimodal", kind] + ([facts["task"]] if facts.get("task") else [])
    lines = ["---", "library_name: ctal", "tags:", *(f"- {t}" for t in tags), "---", "", f"# {title}", "",
             "CTAL: Cross-modal Transformer for Audio-and-Language (Li et al., EMNLP 2021), "
             "trained with ctal-ray. " + _WHAT[kind], ""]

    summary = [("kind", kind)]
    summary += [(k, facts[k]) for k in ("task", "fusion", "step", "epoch") if facts.get(k) is not None]
    if facts.get("parameters") is not None:
        summary.append(("parameters", f"{facts['parameters'] / 1e6:.1f}M ({facts['parameters']:,})"))
    summary.append(("data set", facts["data"]))
    summary.append(("tokenizer sha256", facts["tokenizer_hash"]))
    if facts.get("text_normalization") is not None:
        summary.append(("text normalization", facts["text_normalization"]))
    if facts.get("manifest"):  # code, library versions, machine, time
        summary.append(("run manifest", f"[{facts['manifest']}]({facts['manifest']})"))
    lines += _table(("", ""), summary) + [""]

    if facts.get("metrics"):
        lines += ["## Metrics", "", *_table(("metric", "value"), facts["metrics"].items()), ""]
    if facts.get("config"):
        lines += ["## Configuration", "", *_table(("key", "value"), facts["config"].items()), ""]
    if facts.get("command"):
        command = facts["command"]
        command = command if isinstance(command, str) else shlex.join(str(a) for a in command)
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    lines += ["## Loading", "", "```python", "import ctal  # registers CTAL with transformers' Auto classes",
              f"from transformers import {_AUTO_CLASS[kind]}", "",
              f'model = {_AUTO_CLASS[kind]}.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(lines)
