"""The console: progress lines with time left when stdout is no terminal; a pipeline run shows our
stage and metric lines and none of Ray's chatter, which --verbose brings back."""
import subprocess
import sys
from pathlib import Path

import pytest

from ctal import console
from ctal.runlog import step_line, step_of

REPO = Path(__file__).resolve().parents[1]
RAY_CHATTER = ("PlacementGroupCleaner", "TrainingReport(", "Checkpoint successfully created",
               "State API may be temporarily unavailable")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_without_a_terminal_prints_occasional_lines_with_time_left(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    with console.Progress(40, "pretrain", unit="steps", initial=10) as bar:
        clock.t += 5
        bar.set(12)  # within PLAIN_EVERY_S of the start: no line yet
        assert capsys.readouterr().err == ""
        clock.t += console.PLAIN_EVERY_S
        bar.set(20)  # 8 steps in 30 s since the first update (start-up left out) → 20 steps left ≈ 75 s
        assert capsys.readouterr().err == "[pretrain] 20/40 steps (50%), 0:35 elapsed, ~1:15 left\n"
        bar.write("step      20 | loss 1.0")
        clock.t += 35
        bar.set(40)
    out = capsys.readouterr()
    assert out.out == "step      20 | loss 1.0\n"
    assert out.err == "[pretrain] 40/40 steps (100%), 1:10 elapsed\n"  # the closing line: done, no estimate


def test_progress_wraps_an_iterable_and_counts_everything(capsys):
    assert list(console.progress(iter(range(7)), 7, "synthesize mosei", unit="utterances")) == list(range(7))
    assert capsys.readouterr().err.startswith("[synthesize mosei] 7/7 utterances (100%)")


def test_verbose_travels_in_the_environment(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose()
    console.set_verbose(True)
    assert console.verbose()
    console.set_verbose(False)
    assert not console.verbose()


def test_the_driver_reads_the_step_back_from_the_metric_line_only():
    line = step_line({"step": 12, "loss": 1.5, "mlm_loss": 2.0, "masked_acoustic_loss": 1.0, "lr": 1e-3,
                      "samples_per_s": 4.0, "padding_efficiency": 0.5})
    assert line.startswith("step      12 | loss 1.5000 |")
    assert step_of(line) == 12
    for other in ("checkpoint /runs/x/checkpoints/step-00000010", "resumed from /x (step 10)", "step 3 of 4"):
        assert step_of(other) is None


def _pretrain(data: Path, storage: Path, name: str, *extra: str) -> str:
    p = subprocess.run([sys.executable, "pipelines/pretrain.py", "--data", str(data), "--size", "narrow",
                        "--num-workers", "2", "--storage", str(storage), "--name", name, "--address", "local",
                        *extra, "split=train", "max_steps=6", "log_every=2", "checkpoint_every=3", "batch_size=4",
                        "cpus_per_worker=0.5", "bucket_pool_rows=16"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow
def test_a_pretraining_run_shows_our_lines_and_ray_chatter_only_with_verbose(tmp_path):
    from tiny_data import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data")
    quiet = _pretrain(data, tmp_path / "runs", "quiet")
    for chatter in RAY_CHATTER + ("(RayTrainWorker", "(TrainController", "Started a local Ray instance"):
        assert chatter not in quiet, chatter
    assert "[pretrain] CTAL (narrow)" in quiet  # the stage line
    steps = [step_of(line) for line in quiet.splitlines()]
    assert [s for s in steps if s is not None] == [2, 4, 6]  # rank 0's metric lines, once each
    assert "[pretrain] 6/6 steps (100%)" in quiet  # the progress line (stderr is no terminal here)
    assert "done: step 6" in quiet

    loud = _pretrain(data, tmp_path / "runs", "loud", "--verbose")
    assert "(RayTrainWorker" in loud or "(TrainController" in loud  # worker output is back
    assert [s for s in map(step_of, loud.splitlines()) if s is not None] == [2, 4, 6]


def test_tunes_per_trial_fetch_warnings_stay_off_the_console_unless_verbose(tmp_path):
    """Issue 30 (weak): a rerun of a killed study printed Ray's 7-line "Failed to fetch metrics"
    warning; the results table already says which trials have no result."""
    code = ("import logging, sys; from ctal import console; from ctal.distributed.console import quiet_driver; "
            "console.set_verbose(sys.argv[1] == 'v'); logging.basicConfig(); quiet_driver(); "
            "logging.getLogger('ray.tune.analysis.experiment_analysis').warning('Failed to fetch metrics for 1 trial(s)')")
    for mode, shown in (("q", False), ("v", True)):
        err = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stderr
        assert ("Failed to fetch metrics" in err) == shown, err


RAY_DATA_LINE = ("[2026-12-07 08:19:27,812 E 11216 11216] core_worker.cc:2465: Actor with class name: "
                 "'MapWorker(MapBatches(_ShardWriter))' and ID: 'ebfd52e1' has constructor arguments in the object "
                 "store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the "
                 "actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n")


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_datas_constructor_arguments_line_is_dropped_and_every_other_byte_passes(verbose, monkeypatch, capfd):
    """Issue 30 (weak): Ray's C++ core worker printed its ERROR line about Ray Data's actor constructor
    arguments (ray-project/ray#57733) on the preprocessing console. Only that line is dropped from file
    descriptor 2 (where the C++ code writes), other C++ errors and partial lines (a progress bar's redraw)
    pass as they were, fd 2 is restored after, and --verbose keeps everything."""
    import os

    from ctal.distributed.console import dropping_stderr_lines

    monkeypatch.setattr(console, "verbose", lambda: verbose)
    monkeypatch.setattr("ctal.distributed.console.verbose", lambda: verbose)
    other = "[2026-12-07 08:19:28,001 E 11216 11300] core_worker.cc:900: Failed to register actor\n"
    before = os.fstat(2)
    with dropping_stderr_lines():
        os.write(2, b"start\n" + RAY_DATA_LINE[:40].encode())  # the C++ line split over two writes
        os.write(2, RAY_DATA_LINE[40:].encode() + other.encode())
        os.write(2, b"\r[preprocess] 4/8 utterances")  # no newline: still shown at once
    os.write(2, b"\nafter\n")
    assert (os.fstat(2).st_ino, os.fstat(2).st_dev) == (before.st_ino, before.st_dev)
    err = capfd.readouterr().err
    kept = "start\n" + other + "\r[preprocess] 4/8 utterances\nafter\n"
    assert err == (kept.replace("start\n", "start\n" + RAY_DATA_LINE) if verbose else kept), err
