"""The demo's library side (no Ray): its sizes, resumable stages, corpora, test evaluation and report.

`pipelines/demo.py` composes these with the Ray stages (preprocessing, pretraining, the sweep).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .corpora.synthetic import synthesize
from .data import TaskData
from .finetune import evaluate
from .variants import FUSION_VARIANTS
from .report import markdown_table, write_demo_report

# The variants that read one stream: the demo's label needs both, so these show chance.
UNIMODAL = tuple(name for name, v in FUSION_VARIANTS.items() if not (v.text and v.audio))
SIZES = {  # task and pretraining utterances, pretraining steps, fine-tuning epochs, fusion variants
    "full": dict(utterances=1200, pretrain_utterances=1200, steps=600, epochs=30,
                 variants=tuple(FUSION_VARIANTS), restarts=2),
    "quick": dict(utterances=1200, pretrain_utterances=600, steps=100, epochs=20,
                  variants=("ctal", *UNIMODAL), restarts=1),
    # pipelines/ablate.py --demo: pretraining on more read speech than the task holds, so pretraining
    # has something to teach; epochs, seeds and fractions are the study's (configs/ablate_demo*.yaml).
    "ablate": dict(utterances=480, pretrain_utterances=1200, steps=600),
    "ablate-quick": dict(utterances=100, pretrain_utterances=120, steps=20),
}
# Frames every 40 ms (50 ms windows) instead of the paper's 10 ms: a quarter of the audio-stream cost,
# so a CPU affords the epochs the interaction label needs.
DEMO_FEATURES = ["features.frame_shift_ms=40", "features.frame_length_ms=50"]
TEST_COLUMNS = ["fusion", "acc2", "f1", "mae", "corr", "acc7"]


SIZE_FILE = "size.json"


def check_size(out: Path, size: dict) -> None:
    """Stages are reused by name: ValueError if ``out`` holds stages of another size (a quick demo's,
    say), which a rerun would reuse and report as this size's; else record this size."""
    path = out / SIZE_FILE
    if path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(size)):  # tuples read back as lists
        raise ValueError(f"{out} holds a demo of another size ({path.read_text().strip()}); its finished stages "
                         "would be reused as this one's: pass --fresh to redo them, or another --out")
    path.write_text(json.dumps(size))


def stage(out: Path, name: str):
    """The stage's recorded result if it finished in an earlier run, else None (--fresh removed them)."""
    marker = out / f"{name}.done.json"
    if not marker.is_file():
        return None
    print(f"[{name}] reusing {marker.parent / name} (finished earlier; --fresh redoes it)")
    return json.loads(marker.read_text())


def done(out: Path, name: str, result: dict, t0: float) -> dict:
    """Record a finished stage's result so a rerun reuses it."""
    (out / f"{name}.done.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"[{name}] done in {time.time() - t0:.0f} s")
    return result


def synthesize_corpora(out: Path, size: dict, seed: int, corpus: Path, pre_corpus: Path) -> dict:
    """Stage 1: read speech to pretrain on (LibriSpeech layout) and the fusion task (MOSEI layout).

    Pretraining on the task corpus itself taught cross-attention to ignore the text (its audio hides
    the adjective), and ctal then often sat at chance for 30 epochs; on read speech, where audio
    follows text, it left chance at epoch 3 (600 steps) or 14 (300 steps).
    """
    t0 = time.time()
    print(f"[corpus] synthesizing {size['pretrain_utterances']} LibriSpeech-layout utterances → "
          f"{pre_corpus} and {size['utterances']} MOSEI-layout ones → {corpus} with eSpeak NG")
    for path in (corpus, pre_corpus):
        if path.exists():
            shutil.rmtree(path)
    return done(out, "corpus", {
        "pretrain": synthesize("librispeech", pre_corpus, size["pretrain_utterances"], seed),
        "task": synthesize("mosei", corpus, size["utterances"], seed)}, t0)


def preprocess_corpora(out: Path, configs: Path, jobs: dict, run_preprocess) -> dict:
    """Stage 2: every corpus of ``jobs`` (name → (layout, root, dest)) to Parquet with one shared BPE
    tokenizer (the fine-tuned model keeps the pretrained embeddings). ``run_preprocess``: the Ray Data
    stage (ctal.distributed.preprocess.run_preprocess), passed in so this module stays Ray-free."""
    from .config import DataConfig, load_config
    from .corpora import read_corpus
    from .featurize import train_transcript_tokenizer

    t0 = time.time()
    manifests = {name: read_corpus(layout, root) for name, (layout, root, _) in jobs.items()}
    data_cfg = load_config(DataConfig, [configs / "preprocess.yaml"],
                           ["vocab_size=2000", f"tokenizer={out / 'tokenizer'}", *DEMO_FEATURES])
    train_transcript_tokenizer([r for m in manifests.values() for r in m], data_cfg, out / "tokenizer")
    reports = {name: run_preprocess(layout, root, dest, data_cfg, overwrite=True, rows=manifests[name])
               for name, (layout, root, dest) in jobs.items()}
    return done(out, "data", {name: {"written": r.get("written"), "quarantined": r.get("quarantined")}
                              for name, r in reports.items()}, t0)


def pretrain_read_speech(out: Path, configs: Path, size: dict, pre_data: Path, workers: int, seed: int,
                         pretrain) -> dict:
    """Stage 3: the narrow 3+3 CTAL pretrained on the read speech; ``pretrain``: the Ray Train stage
    (ctal.distributed.train.pretrain). Returns {"checkpoint", "run_dir"}."""
    from .config import PretrainConfig, load_config

    t0 = time.time()
    cfg = load_config(PretrainConfig, [configs / "pretrain.yaml", configs / "narrow.yaml"], [
        f"data={pre_data}", "split=train-clean-100", f"max_steps={size['steps']}",
        f"num_workers={workers}", "lr=1e-3", f"batch_size={8 * workers}", "max_frames=1000", "log_every=10",
        f"checkpoint_every={max(10, size['steps'] // 3)}", f"storage_path={out}", "run_name=pretrain",
        f"seed={seed}", "shrink_cpus_per_worker=true"])
    result = pretrain(cfg)
    return done(out, "pretrain", {"checkpoint": str(result.checkpoint), "run_dir": str(result.run_dir)}, t0)


def restrict_space(space: dict, size: dict) -> dict:
    """The demo's search space (as read from YAML) cut to this size's variants and seed restarts."""
    space = {**space, "fusion": dict(space["fusion"]), "seed": dict(space["seed"])}
    space["fusion"]["choice"] = [v for v in space["fusion"]["choice"] if v in size["variants"]]
    space["seed"]["choice"] = space["seed"]["choice"][:size["restarts"]]
    return space


def evaluate_variants(checkpoints: dict, task_data: TaskData, variants) -> list[dict]:
    """Stage 5: test metrics of each variant's best checkpoint (one row per variant that has one)."""
    t0 = time.time()
    rows = []
    for fusion in variants:
        ckpt = checkpoints.get(fusion)
        if ckpt is None:
            print(f"[evaluate] {fusion}: no checkpoint (trial failed?)")
            continue
        metrics, _ = evaluate(ckpt, task_data, role="test", task="sentiment")
        rows.append({"fusion": fusion, **{k: float(v) for k, v in metrics.items()}})
    print(f"[evaluate] done in {time.time() - t0:.0f} s")
    return rows


def demo_report(out: Path, size: dict, rows: list[dict], *, workers: int, wall_s: float,
                pretrain_metrics: dict, sweep_table_md: str) -> Path:
    """Stage 6: <out>/report.md (+ plots, test_metrics.json); prints the test table."""
    columns = [c for c in TEST_COLUMNS if c == "fusion" or (rows and c in rows[0])]
    summary = [f"Synthetic CMU-MOSEI-layout corpus: {size['utterances']} utterances (eSpeak NG); the label "
               "is the text's polarity, flipped when spoken with ironic prosody (the audio has a censor "
               "tone where the adjective is), so text alone and audio alone sit at chance (Acc-2 ≈ 0.5).",
               f"Pretraining: narrow 3+3 CTAL on {size['pretrain_utterances']} LibriSpeech-layout utterances, "
               f"{size['steps']} steps, {workers} Ray Train workers. "
               f"Fine-tuning: {size['epochs']} epochs per fusion variant and seed ({size['restarts']} "
               "seed(s)); the checkpoint best on dev MAE is tested.",
               f"Total wall time: {wall_s:.0f} s."]
    path = write_demo_report(out, summary=summary, test_rows=rows, columns=columns, metric="acc2",
                             pretrain_metrics=pretrain_metrics, sweep_table_md=sweep_table_md, unimodal=UNIMODAL)
    print("\n" + markdown_table(rows, columns) + "\n")
    return path
