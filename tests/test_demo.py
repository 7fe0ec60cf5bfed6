"""The --quick demo end to end on local Ray: every stage runs, the report is written, cross-modal
fusion beats both unimodal variants on the test split, reruns reuse finished stages."""
import json

import pytest

from ctal.demo import SIZES
from pipelines.demo import main as demo_main

VARIANTS = SIZES["quick"]["variants"]
UNIMODAL = ("text_only", "audio_only")


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out)]) == 0
    for stage in ("corpus", "data", "pretrain", "sweep"):
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
    capsys.readouterr()

    assert demo_main(["--quick", "--out", str(out)]) == 0  # rerun: finished stages are reused
    printed = capsys.readouterr().out
    for stage in ("corpus", "data", "pretrain", "sweep"):
        assert f"[{stage}] reusing" in printed
