"""README's walk-through, pasted in order: every line of its first bash block runs as written; then
every docs/ block marked to run after it (``<!-- after the walk-through ... -->`` just above its fence)."""
import os
import re
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
    """(page, line) of every docs/ bash block marked to run after the walk-through, in page order."""
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
    # the docs' commands that continue from the walk-through (docs/tracking.md), in the same directory
    docs = after_walkthrough()
    assert any("tracking=mlflow" in line for _, line in docs), docs
    for page, line in docs:
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"docs/{page}: {line}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert (tmp_path / "runs" / "libri-tracked" / "mlflow.db").is_file()
    assert (tmp_path / "runs" / "tune" / "sentiment-tracked" / "mlflow.db").is_file()
