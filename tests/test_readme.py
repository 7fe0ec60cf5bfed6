"""README's walk-through, pasted in order: every line of its first bash block runs as written (slow
tier). The docs/ blocks marked to follow it (``<!-- after the walk-through ... -->`` just above the
fence: docs/tracking.md's, the walk-through tracked) are checked against it in the default tier: they
are its own lines with ``tracking=mlflow`` under their own run names, so they run wherever it does,
and tracking through those recipes is run in tests/test_tracking.py and tests/test_secrets.py."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The pipelines"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def after_walkthrough() -> list[tuple[str, str]]:
    """(page, line) of every docs/ bash block marked to follow the walk-through, in page order."""
    marked, fence = [], re.compile(r"<!-- after the walk-through[^>]*-->\n```bash\n(.*?)```", re.S)
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in fence.findall(page.read_text()):
            marked += [(page.name, line) for line in block.splitlines()
                       if line.strip() and not line.startswith("#")]
    return marked


def test_the_walkthrough_has_no_placeholders():
    lines = walkthrough()
    assert len(lines) >= 8 and all(line.startswith(("python pipelines/", "printf ")) for line in lines)
    assert not any(re.search(r"\[|NNNN|\bDIR\b|YOUR-", line) for line in lines)


@pytest.mark.slow
def test_the_walkthrough_runs_as_pasted(tmp_path):
    # A fresh working directory that looks like the checkout (the recipes find configs/ next to them).
    for name in ("pipelines", "configs", "search_spaces"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CTAL_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)  # each recipe starts its own local Ray, as on a laptop
    outputs = []
    for line in walkthrough():
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        if "preprocess.py" in line:  # Ray Data's C++ line on its actors' arguments stays in Ray's log
            assert "core_worker.cc" not in run.stdout + run.stderr, run.stderr
        outputs.append(run.stdout)
    # one vocabulary: the task data was tokenized with the pretraining data's tokenizer
    import json
    libri, mosei = (json.loads((tmp_path / "data" / d / "report.json").read_text())["tokenizer"]["hash"]
                    for d in ("libri", "mosei"))
    assert libri == mosei
    evaluate = next(o for line, o in zip(walkthrough(), outputs) if "evaluate.py" in line)
    assert re.search(r"main\s+[\d.]+\s+-?[\d.]+\s+[\d.]+", evaluate), evaluate  # the test metrics row
    table = pq.read_table(tmp_path / "data" / "emb.parquet")
    assert table.num_rows == 1 and table.column_names[:2] == ["id", "embedding"]


def test_the_docs_blocks_after_the_walkthrough_are_its_lines_tracked_under_their_own_names():
    """docs/tracking.md's block, pasted after the walk-through in the same directory: each line is a
    walk-through line plus ``tracking=mlflow``, its run names given ``-tracked`` (so none of the
    walk-through's runs is overwritten); and the stores its ``mlflow ui`` lines open are where those
    runs put theirs (``mlflow.db`` in the run's directory; evaluation writes beside its checkpoint,
    i.e. into the sweep's)."""
    from ctal.config import FinetuneConfig, PretrainConfig, TrackingConfig, load_config
    from ctal.tracking import STORE_FILE

    walk, docs = walkthrough(), after_walkthrough()
    assert [page for page, _ in docs] == ["tracking.md"] * 3, docs
    stores = []
    for _, line in docs:
        assert line.endswith(" tracking=mlflow"), line
        untracked = line.removesuffix(" tracking=mlflow").replace("-tracked", "")
        assert untracked in walk and untracked != line.removesuffix(" tracking=mlflow"), line
        args = shlex.split(line)
        if "--name" in args:  # pretraining and the sweep: their run directory holds the store
            stores.append(f"{args[args.index('--storage') + 1]}/{args[args.index('--name') + 1]}/{STORE_FILE}")
        else:  # evaluation: the store beside the checkpoint, the sweep's
            checkpoint = Path(args[args.index("--checkpoint") + 1])
            assert f"{checkpoint.parent}/{STORE_FILE}" in stores, (line, stores)
    assert stores == ["runs/libri-tracked/mlflow.db", "runs/tune/sentiment-tracked/mlflow.db"]
    page = (ROOT / "docs" / "tracking.md").read_text()
    assert re.findall(r"mlflow ui --backend-store-uri sqlite:///(\S+)", page) == stores
    for cls in (PretrainConfig, FinetuneConfig, TrackingConfig):  # the key each recipe reads it into
        assert load_config(cls, [], ["tracking=mlflow"]).tracking == "mlflow"
