"""Tables and plots: a sweep's results (one row per trial, best dev epoch) and the demo's report
(test metrics per fusion variant, pretraining loss curve). Markdown + PNG; no Ray here."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from ctal.search_space import PARAMETERS


def markdown_table(rows: list[dict], columns: list[str], float_format: str = ".3f") -> str:
    """One Markdown table; a missing or NaN cell stays empty, "|" inside a cell is escaped."""
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, float_format)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, also on a head-less cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# sweeps


@dataclass
class SweepResult:
    # Paths, or URI strings when the sweep's storage is a URI (ctal.storage reads either)
    experiment: Path
    table_csv: Path
    table_md: Path
    plots: list[Path]
    best_checkpoint: Optional[Path]
    best: Optional[dict]  # the best trial's row of the table
    table: Any  # pandas DataFrame, one row per trial
    errors: dict  # trial → error message
    trial_checkpoints: dict = field(default_factory=dict)  # trial → its best checkpoint

    def best_per_fusion(self) -> dict:
        """fusion variant → the best checkpoint of its trial best on dev (the table is sorted by it)."""
        best = {}
        for trial, fusion in zip(self.table["trial"], self.table["fusion"]):
            if trial in self.trial_checkpoints:
                best.setdefault(fusion, self.trial_checkpoints[trial])
        return best


def trial_row(trial: str, config: dict, history: Optional[pd.DataFrame], error: str, epochs: int,
              metric: str, mode: str) -> tuple[dict, Optional[pd.Series]]:
    """A trial's row of the results table, and the report of its best epoch (None before any).

    `config`: the sampled parameters; `history`: the trial's reports that carry `metric`; `error`: its
    error message, "" if none; `epochs`: what a trial runs unless the space sets it."""
    row = {"trial": trial, "status": "", "fusion": config.get("fusion"),
           **{k: config[k] for k in PARAMETERS if k in config and k != "fusion"}}
    best = None
    if history is not None and len(history):
        best = history.loc[((1 if mode == "min" else -1) * history[metric]).idxmin()]
        row.update({"epochs_run": int(history["epoch"].max()), "best_epoch": int(best["epoch"]),
                    **{k: float(best[k]) for k in history.columns if k.startswith("dev_")}})
    row["status"] = ("error" if error else
                     "done" if row.get("epochs_run") == config.get("epochs", epochs) else "stopped early")
    row["error"] = error
    return row, best


def write_results(rows: list[dict], curves: dict, metric: str, mode: str, out: Path
                  ) -> tuple[pd.DataFrame, Path, Path, list[Path]]:
    """results.csv and results.md (trials best first) and the plots, in `out`; `curves`: trial →
    (fusion, epochs, dev metric per epoch). Returns (table, csv path, Markdown path, plot paths)."""
    table = pd.DataFrame(rows)
    if metric in table:
        table = table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(_sweep_markdown(table) + "\n")
    return table, csv_path, md_path, plot_results(table, curves, metric, mode, out)


def _sweep_markdown(table: pd.DataFrame) -> str:
    return markdown_table(table.to_dict("records"), list(table.columns), float_format=".4g")


def plot_results(table: pd.DataFrame, curves: dict, metric: str, mode: str, out: Path) -> list[Path]:
    """best dev metric per fusion variant (bar) and dev learning curves (one line per trial)."""
    plt = _pyplot()
    paths = []
    if metric in table and "fusion" in table and table[metric].notna().any():
        best = table.dropna(subset=[metric]).groupby("fusion")[metric]
        best = best.min() if mode == "min" else best.max()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(best.index.astype(str), best.values, color="tab:blue")
        ax.set_ylabel(metric)
        ax.set_title(f"best {metric} per fusion variant")
        for i, v in enumerate(best.values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        paths.append(_save(fig, out / "best_per_fusion.png"))
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        variants = sorted({str(f) for f, _, _ in curves.values()})
        colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
        for fusion, epochs, values in curves.values():
            ax.plot(epochs, values, marker="o", ms=3, color=colors[str(fusion)], alpha=0.8)
        for v in variants:
            ax.plot([], [], color=colors[v], label=v)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title("learning curves (one line per trial)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "learning_curves.png"))
    return paths


def describe(result: SweepResult, task) -> str:
    """What the sweep recipe prints at the end."""
    lines = [_sweep_markdown(result.table) + "\n"]
    if result.errors:
        lines.append(f"{len(result.errors)} trial(s) failed (the sweep went on):")
        lines += [f"  {t}: {e}" for t, e in result.errors.items()]
    if result.best:
        lines.append(f"best trial {result.best['trial']}: dev {task.metric} "
                     f"{result.best['dev_' + task.metric]:.4f} (epoch {result.best['best_epoch']})")
    lines += [f"results table: {result.table_csv}", f"results table: {result.table_md}"]
    lines += [f"plot: {p}" for p in result.plots]
    if result.best_checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the demo's report


def plot_variants(rows: list[dict], metric: str, out: Path, chance: float | None = None,
                  unimodal: tuple = ()) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["fusion"] for r in rows]
    colors = ["tab:gray" if n in unimodal else "tab:blue" for n in names]
    ax.bar(names, [r[metric] for r in rows], color=colors)
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
        ax.legend()
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"Test {metric} per fusion variant (grey: unimodal)")
    return _save(fig, out)


def plot_pretraining(metrics: dict[int, dict], out: Path) -> Path:
    plt = _pyplot()
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
    return _save(fig, out)


def write_demo_report(out_dir: Path, *, summary: list[str], test_rows: list[dict], columns: list[str],
                      metric: str, pretrain_metrics: dict[int, dict], sweep_table_md: str,
                      unimodal: tuple = ()) -> Path:
    out_dir = Path(out_dir)
    bars = plot_variants(test_rows, metric, out_dir / "test_per_fusion.png",
                         chance=0.5 if metric == "acc2" else None, unimodal=unimodal)
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


# --------------------------------------------------------------------------------------------------
# ablation studies (ctal.ablation): cells with mean and 95 % interval over seeds


def plot_label_efficiency(cells: pd.DataFrame, metric: str, out: Path) -> Optional[Path]:
    """Test metric vs label fraction, one line per init level (pretrained, scratch) at the cells'
    other factors, the 95 % interval over seeds as a band; None when no init level spans 2 fractions."""
    curves = [(init, g.sort_values("fraction")) for (init, *_), g in
              cells.groupby(["init", "fusion", "orthogonality_weight"]) if g["fraction"].nunique() > 1]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for init, g in curves:
        line, = ax.plot(g["fraction"], g["mean"], marker="o", label=f"{init} ({g['fusion'].iloc[0]})")
        ax.fill_between(g["fraction"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(sorted(cells["fraction"].unique()), [f"{f:g}" for f in sorted(cells["fraction"].unique())])
    ax.set_xlabel("fraction of the labelled training set")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("label efficiency (band: 95 % interval over seeds)")
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_question(cells: pd.DataFrame, factor: str, across: tuple, metric: str, title: str, out: Path) -> Path:
    """One bar per cell of a question (grouped by its `across` levels), error bars = 95 % interval."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [", ".join(f"{a}={r[a]:g}" for a in across) + (" " if across else "") + str(r[factor])
              for r in cells.to_dict("records")]
    means = cells["mean"].to_numpy(dtype=float)
    err = [means - cells["ci_low"].to_numpy(dtype=float), cells["ci_high"].to_numpy(dtype=float) - means]
    ax.bar(range(len(means)), means, yerr=[[0 if math.isnan(e) else e for e in side] for side in err],
           capsize=4, color="tab:blue")
    ax.set_xticks(range(len(means)), labels)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title, fontsize=9)
    return _save(fig, out)
