"""Killing a sweep's driver mid-grid, for the tests that resume it (test_tune, test_ablation)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def finished_trials(experiment: Path) -> list[str]:
    """Trial ids Tune's saved experiment state marks TERMINATED (empty while it is being written)."""
    try:
        state = json.loads(max(Path(experiment).glob("experiment_state-*.json")).read_text())
    except (ValueError, OSError):  # none yet, or caught mid-write
        return []
    trials = [json.loads(t[0]) for t in state["trial_data"]]
    return [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]


def kill_mid_grid(cmd: list[str], env: dict, experiment: Path, total: int, log_path: Path,
                  timeout: float) -> list[str]:
    """Run the driver ``cmd`` in a process group of its own; SIGKILL the group as soon as Tune's saved
    state under ``experiment`` records a finished trial while others of ``total`` remain (trial
    files are synced together with that state). Returns the finished trial ids."""
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                done = finished_trials(experiment)
                if 1 <= len(done) < total:
                    return done
                assert driver.poll() is None, Path(log_path).read_text()[-3000:]
                time.sleep(0.1)
            pytest.fail("no trial finished in time:\n" + Path(log_path).read_text()[-3000:])
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started, by its group id
            driver.wait()
