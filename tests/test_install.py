"""A real install: the wheel (not an editable install) in a fresh virtual environment gives a `ctal`
command whose recipes find their configs and search spaces; run from a directory outside the
checkout, `ctal demo --quick` runs every stage, and cross-modal fusion beats both unimodal
variants on the test split (the suite's one run of the demo).

The fresh environment reuses this one's heavy dependencies (torch, Ray) instead of downloading
them: a .pth file puts this interpreter's site-packages on its path. Python does not process .pth
files found in a directory added that way, so an editable install of the checkout there does not
leak in; the tests check that ctal is imported from the new environment.
"""
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from ctal.demo import SIZES

REPO = Path(__file__).resolve().parents[1]
VARIANTS = SIZES["quick"]["variants"]
UNIMODAL = ("text_only", "audio_only")
STAGES = ("corpus", "data", "pretrain", "sweep")


def checkout_files() -> list[Path]:
    """The checkout's files as git sees them (tracked and new, not ignored), relative paths."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True, text=True).stdout
    return [Path(f) for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: a build writes build/ and ctal.egg-info/ beside the sources, and no
    # leftover of an earlier build in the work tree may slip into the wheel.
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy the sources from")
    tmp = tmp_path_factory.mktemp("wheel")
    for rel in checkout_files():
        (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "src" / rel).write_bytes((REPO / rel).read_bytes())
    # no build isolation: nothing is downloaded (the test extra brings setuptools)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), str(tmp / "src")], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("ctal-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv holding the wheel; returns the clean environment to run it in and a directory
    outside the checkout to run it from."""
    tmp = tmp_path_factory.mktemp("installed")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    (tmp / "work").mkdir()
    # no PYTHONPATH, no RAY_ADDRESS (the command starts its own local Ray, as on a laptop)
    env = {"PATH": f"{env_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp)),
           "CTAL_CACHE_DIR": str(tmp / "cache"), "LANG": "C.UTF-8"}
    return {"venv": env_dir, "python": python, "env": env, "cwd": tmp / "work"}


def run(installed, *cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, cmd)], cwd=installed["cwd"], env=installed["env"], capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_ships_every_module_config_and_search_space_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = checkout_files()
    expected = {f.as_posix() for f in files if f.parts[0] == "ctal" and f.suffix == ".py"}
    expected |= {f"ctal/{f.as_posix()}" for f in files if f.parts[0] in ("configs", "search_spaces")}
    expected |= {f"ctal_pipelines/{f.name}" for f in files if f.parts[0] == "pipelines" and f.suffix == ".py"}
    assert len(expected) > 60 and expected - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ctal = ctal_pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_ctal_command_lists_every_recipe_and_runs_one(installed):
    from pipelines.cli import COMMANDS

    where = run(installed, installed["python"], "-c",
                "import ctal, ctal_pipelines; print(ctal.__file__); print(ctal_pipelines.__file__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():  # the wheel's copies, not the checkout's
        assert Path(line).is_relative_to(installed["venv"]), where.stdout
    help_ = run(installed, "ctal", "--help")
    assert help_.returncode == 0, help_.stderr
    assert all(f"  {name} " in help_.stdout for name in COMMANDS), help_.stdout
    assert "convert-release" in COMMANDS and "synthesize" in COMMANDS
    recipe = run(installed, "ctal", "pretrain", "--help")
    assert recipe.returncode == 0 and recipe.stdout.startswith("usage: ctal pretrain"), recipe.stdout
    # the shipped configs are found: a bad override fails on the key, after they loaded
    bad = run(installed, "ctal", "pretrain", "--data", "nowhere", "--size", "narrow", "no_such_key=1")
    assert bad.returncode == 2 and "no_such_key" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_quick_demo_from_the_installed_wheel_runs_every_stage_and_fusion_beats_each_stream(installed):
    out = installed["cwd"] / "demo"
    first = run(installed, "ctal", "demo", "--quick", "--out", out, timeout=3600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    for stage in STAGES:
        assert (out / f"{stage}.done.json").is_file(), stage
    report = (out / "report.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in report
    assert (out / "test_per_fusion.png").stat().st_size > 0
    assert (out / "pretraining_loss.png").stat().st_size > 0

    # What CTAL is for: the label needs both streams, so the unimodal variants stay near chance and
    # the cross-modal ones (ctal in --quick) clear them by a wide margin on held-out speakers.
    acc2 = {r["fusion"]: r["acc2"] for r in json.loads((out / "test_metrics.json").read_text())}
    assert set(acc2) == set(VARIANTS)
    for v in UNIMODAL:
        assert acc2[v] < 0.65, acc2
    for v in set(VARIANTS) - set(UNIMODAL):
        assert acc2[v] > 0.85 and acc2[v] > max(acc2[u] for u in UNIMODAL) + 0.25, acc2

    # Every run of the demo has its manifest, written by the wheel's code (no git checkout there).
    command = f"ctal demo --quick --out {out}"
    for where, kind in ((out, "demo"), (out / "pretrain", "pretraining"), (out / "sweep", "sweep"),
                        (out / "data", "preprocessing")):
        m = json.loads((where / "manifest.json").read_text())
        assert m["kind"] == kind and m["status"] == "finished" and m["ended_at"] >= m["started_at"], where
        assert m["ctal"]["commit"] == "no git" and m["command"] == command, m
    for ckpt in (out / "pretrain" / "checkpoints").iterdir():
        m = json.loads((ckpt / "manifest.json").read_text())
        assert m["run"]["manifest"] == str(out / "pretrain" / "manifest.json") and m["command"] == command
    best = json.loads((out / "sweep" / "best_checkpoint" / "manifest.json").read_text())
    assert best["kind"] == "finetuning" and best["run"]["manifest"] == str(out / "sweep" / "manifest.json")

    again = run(installed, "ctal", "demo", "--quick", "--out", out, timeout=1200)  # finished stages are reused
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"[{stage}] reusing" in again.stdout, again.stdout[-3000:]
    assert [p["status"] for p in json.loads((out / "manifest.json").read_text())["previous"]] == ["finished"]
