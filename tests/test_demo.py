"""The --quick demo end to end on local Ray: every stage runs, the report is written, reruns reuse."""
import pytest

from pipelines.demo import main as demo_main

VARIANTS = ("ctal", "first_token", "mean_pool", "late_concat", "text_only", "audio_only")


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
    capsys.readouterr()

    assert demo_main(["--quick", "--out", str(out)]) == 0  # rerun: finished stages are reused
    printed = capsys.readouterr().out
    for stage in ("corpus", "data", "pretrain", "sweep"):
        assert f"[{stage}] reusing" in printed
