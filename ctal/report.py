"""The demo's report: test metrics per fusion variant, pretraining loss curve, Markdown + PNG."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

UNIMODAL = ("text_only", "audio_only")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_variants(rows: list[dict], metric: str, out: Path, chance: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["fusion"] for r in rows]
    colors = ["tab:gray" if n in UNIMODAL else "tab:blue" for n in names]
    ax.bar(names, [r[metric] for r in rows], color=colors)
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
        ax.legend()
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"Test {metric} per fusion variant (grey: unimodal)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_pretraining(metrics: dict[int, dict], out: Path) -> Path:
    steps = sorted(metrics)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in ("loss", "mlm_loss", "masked_acoustic_loss"):
        ys = [metrics[s].get(key) for s in steps]
        if any(y is not None for y in ys):
            ax.plot(steps, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("CTAL pretraining (MLM + masked acoustic L1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(out_dir: Path, *, summary: list[str], test_rows: list[dict], columns: list[str],
                 metric: str, pretrain_metrics: dict[int, dict], sweep_table_md: str) -> Path:
    out_dir = Path(out_dir)
    bars = plot_variants(test_rows, metric, out_dir / "test_per_fusion.png", chance=0.5 if metric == "acc2" else None)
    curve = plot_pretraining(pretrain_metrics, out_dir / "pretraining_loss.png")
    text = ["# ctal-ray demo report", "", *summary, "",
            "## Test metrics per fusion variant (best dev checkpoint of each)", "",
            markdown_table(test_rows, columns), "", f"![test per fusion]({bars.name})", "",
            "## Pretraining", "", f"![pretraining loss]({curve.name})", "",
            "## Sweep (dev metrics)", "", sweep_table_md, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text))
    (out_dir / "test_metrics.json").write_text(json.dumps(test_rows, indent=1))  # the table, for scripts
    return path
