"""A pretraining run's log, every sink in one place: ``metrics.jsonl``, TensorBoard and the experiment
tracker (ctal.tracking), written by rank 0 (``RunLog``); and the readers of what it wrote.

For a URI run directory the files are written in a local staging directory and uploaded at every
checkpoint and at the end (object stores cannot append); a resume downloads ``metrics.jsonl`` first
so the file keeps growing. After a resume the log holds ``{"event": "resume", "step": N}`` and then
the steps from N + 1 again: the later lines win (``read_metrics``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional

from . import storage, tracking
from .config import to_dict

METRICS_FILE = "metrics.jsonl"
TRACKING_EXPERIMENT = "ctal-pretrain"  # the tracker experiment every pretraining run joins (run = run_name)


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step → logged metrics from ``metrics.jsonl``; after a resume the later lines win."""
    path = storage.join(run_dir, METRICS_FILE)
    out: dict[int, dict] = {}
    for line in (storage.read_text(path) if storage.is_file(path) else "").splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec
    return out


def step_line(m: dict) -> str:
    """The metric line the loop logs every ``log_every`` steps (``step_of`` reads the step back)."""
    return (f"step {m['step']:>7d} | loss {m['loss']:.4f} | mlm {m['mlm_loss']:.4f} | "
            f"acoustic {m['masked_acoustic_loss']:.4f} | lr {m['lr']:.2e} | {m['samples_per_s']:.1f} samples/s | "
            f"padding eff {m['padding_efficiency']:.3f}" + (f" | MFU {m['mfu']:.1%}" if "mfu" in m else ""))


def step_of(line: str) -> Optional[int]:
    """The step of a ``step_line``, None for any other line."""
    head = line.split(" | ", 1)[0].split()
    return int(head[1]) if len(head) == 2 and head[0] == "step" and head[1].isdigit() else None


class RunLog:
    """Rank 0's log of the run in ``run_dir`` (a path or URI), from ``step`` on (0: a fresh run)."""

    def __init__(self, run_dir: str | Path, cfg, *, step: int, world_size: int, log: Callable[[str], None]):
        from torch.utils.tensorboard import SummaryWriter

        self.remote, self._staging = None, None
        if storage.is_uri(run_dir):
            self.remote = storage.normalize(run_dir)
            self._staging = tempfile.TemporaryDirectory(prefix="ctal-run-")  # removed even if we fail
            local = Path(self._staging.name)
            if storage.is_file(storage.join(self.remote, METRICS_FILE)):
                storage.download_file(storage.join(self.remote, METRICS_FILE), local / METRICS_FILE)
        else:
            local = Path(run_dir)
            local.mkdir(parents=True, exist_ok=True)
        self.dir = local
        self.writer = SummaryWriter(str(local / "tensorboard"), purge_step=step or None)
        self.file = open(local / METRICS_FILE, "a", encoding="utf-8")
        if step:  # lines after this one supersede earlier lines of the same steps
            self.file.write(json.dumps({"event": "resume", "step": step}) + "\n")
        home = self.remote or str(local)  # the same run directory continues the same tracker run
        self.tracker = tracking.open_run(cfg.tracking, cfg.tracking_uri, home=home, experiment=TRACKING_EXPERIMENT,
                                         run_name=cfg.run_name, config=to_dict(cfg), resume_key=home,
                                         tags={"run_dir": home, "seed": cfg.seed, "world_size": world_size}, log=log)

    def metrics(self, m: dict) -> None:
        """One logged step's metrics (``m["step"]`` and the rest) to every sink."""
        step = m["step"]
        for k, v in m.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(m, step)

    def checkpoint(self, step: int, path: str) -> None:
        """A checkpoint was written: the logs so far go up with it (a URI run), the tracker links it."""
        self._push()
        if self.tracker is not None:
            self.tracker.log_checkpoint(step, path)

    def close(self, finished: bool) -> None:
        """End of the loop; the tracker run ends FINISHED only when the loop ran to its end."""
        if finished:
            self._push()
        self.writer.close()
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish(failed=not finished)
        if self._staging is not None:
            self._staging.cleanup()

    def _push(self) -> None:
        if self.remote is None:
            return
        self.writer.flush()
        self.file.flush()
        storage.upload_file(self.dir / METRICS_FILE, storage.join(self.remote, METRICS_FILE))
        if (self.dir / "tensorboard").is_dir():
            storage.upload_dir(self.dir / "tensorboard", storage.join(self.remote, "tensorboard"))
