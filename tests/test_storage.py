"""Local paths and filesystem URIs (ctal.storage): the helpers, and pretraining and preprocessing
through ``file://`` URIs, which take the code path of ``s3://`` and ``gs://`` (no rename, no append).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ctal import storage
from ctal.checkpoint import STATE_FILE, CheckpointStore
from ctal.config import PretrainConfig, load_config
from ctal.pretrain import CHECKPOINTS, pretrain_loop
from ctal.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=100"]


def test_paths_and_uris_resolve_join_and_name_alike(tmp_path):
    fs, p = storage.resolve(f"file://{tmp_path}/a/")
    assert type(fs).__name__ == "LocalFileSystem" and p == f"{tmp_path}/a"
    assert storage.resolve("rel/x")[1] == str(Path("rel/x").resolve())
    assert storage.join("s3://bucket/runs/", "exp", "ckpt") == "s3://bucket/runs/exp/ckpt"
    assert storage.join(tmp_path, "a") == str(tmp_path / "a")
    assert storage.parent("gs://b/x/y") == "gs://b/x" and storage.name("s3://b/x/y/") == "y"
    assert storage.normalize("file:///a/b/") == "file:///a/b"
    assert storage.local_path(f"file://{tmp_path}") == tmp_path


def test_unknown_schemes_and_object_store_roots_fail_naming_the_uri():
    with pytest.raises(ValueError, match="'nope://bucket'.*cannot open"):
        storage.resolve("nope://bucket/x")
    with pytest.raises(ValueError, match="--root 's3://b/corpus': only local paths and file://"):
        storage.local_path("s3://b/corpus", "--root")


def test_files_and_directories_round_trip_through_a_uri(tmp_path):
    base = f"file://{tmp_path}/store"
    storage.write_text(storage.join(base, "d", "a.txt"), "hello")
    assert storage.read_text(storage.join(base, "d", "a.txt")) == "hello"
    assert storage.listdir(base) == ["d"] and storage.listdir(storage.join(base, "d")) == ["a.txt"]
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "x.bin").write_bytes(b"\x00\x01")
    (local / "marker.json").write_text("{}")
    storage.upload_dir(local, storage.join(base, "up"), last="marker.json")
    back = storage.download_dir(storage.join(base, "up"), tmp_path / "back")
    assert (back / "sub" / "x.bin").read_bytes() == b"\x00\x01" and (back / "marker.json").is_file()
    storage.move(storage.join(base, "up"), storage.join(base, "moved"))
    assert not storage.exists(storage.join(base, "up")) and storage.is_file(storage.join(base, "moved", "marker.json"))
    storage.delete(storage.join(base, "moved"))
    assert storage.listdir(base) == ["d"]


def test_publish_to_a_uri_replaces_the_old_set_marker_first_out_and_last_in(tmp_path, monkeypatch):
    dest = f"file://{tmp_path}/published"
    old = tmp_path / "old"
    old.mkdir()
    (old / "stale.parquet").write_text("old")
    (old / "report.json").write_text("{}")
    storage.publish_dir(old, dest, marker="report.json")
    new = tmp_path / "new"
    new.mkdir()
    for name in ("b.parquet", "report.json", "a.parquet"):
        (new / name).write_text(name)
    copied = []
    real = storage.pafs.copy_files
    monkeypatch.setattr(storage.pafs, "copy_files", lambda s, d, **kw: (copied.append(Path(d).name), real(s, d, **kw)))
    storage.publish_dir(new, dest, marker="report.json")
    assert copied[-1] == "report.json"
    assert storage.listdir(dest) == ["a.parquet", "b.parquet", "report.json"]  # stale.parquet is gone


def test_localize_downloads_once_into_the_cache_and_refreshes_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text("v1")
    local = storage.localize(f"file://{src}", kind="tokenizers")
    assert local.is_relative_to(tmp_path / "cache") and (local / "tokenizer.json").read_text() == "v1"
    (src / "tokenizer.json").write_text("v2")
    assert (storage.localize(f"file://{src}", kind="tokenizers") / "tokenizer.json").read_text() == "v1"
    assert (storage.localize(f"file://{src}", kind="tokenizers", refresh=True) / "tokenizer.json").read_text() == "v2"
    assert storage.localize(src) == src  # a plain path is used where it is


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_data import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("storage") / "data", n=32)


def _cfg(data, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                       [*NARROW, f"data={data}", "max_steps=8", "checkpoint_every=3", "log_every=1", "batch_size=4",
                        "lr=1e-3", "bucket_pool_rows=16", "keep_checkpoints=3", "seed=3", *extra])


def _losses(run) -> dict:
    return {s: m["loss"] for s, m in read_metrics(run).items()}


def test_pretraining_through_file_uris_logs_what_local_paths_log_and_resumes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    quiet = dict(log=lambda _: None)
    pretrain_loop(_cfg(tiny), run_dir=tmp_path / "local", **quiet)
    run = f"file://{tmp_path}/remote"
    out = pretrain_loop(_cfg(f"file://{tiny}"), run_dir=run, **quiet)
    assert out["checkpoint"] == f"{run}/{CHECKPOINTS}/step-00000008"
    assert _losses(run) == _losses(tmp_path / "local")
    assert [s for s, _ in CheckpointStore(f"{run}/{CHECKPOINTS}").list()] == [3, 6, 8]
    assert list((tmp_path / "remote" / "tensorboard").glob("events.out.tfevents.*"))

    # a cut-off upload (no checkpoint.json) is deleted, a damaged checkpoint moved aside; the run
    # resumes from the newest intact one on a fresh node (nothing local) and logs the same losses
    storage.delete(f"{run}/{CHECKPOINTS}/step-00000008/{STATE_FILE}")
    model = tmp_path / "remote" / CHECKPOINTS / "step-00000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="step-00000006 is damaged"):
        pretrain_loop(_cfg(f"file://{tiny}"), run_dir=run, **quiet)
    lines = [json.loads(x) for x in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("event") == "resume"] == [3]
    assert _losses(run) == _losses(tmp_path / "local")
    names = storage.listdir(f"{run}/{CHECKPOINTS}")
    assert [n for n in names if n.startswith("step-")] == ["step-00000003", "step-00000006", "step-00000008"]
    assert any(n.startswith("corrupt-step-00000006-") for n in names)


# -- preprocessing into a URI (Ray Data, the session's local Ray) ------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import soundfile as sf

    root = tmp_path_factory.mktemp("uri_corpus")
    rng = np.random.default_rng(0)
    lines = ["id,audio_path,text,speaker,split"]
    for i in range(6):
        sf.write(root / f"u{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        lines.append(f"u{i},u{i}.wav,a quick word number {i},s{i % 2},train")
    lines.append("bad,missing.wav,no audio here,s0,train")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_preprocessing_into_a_file_uri_gives_a_data_set_pretraining_reads(manifest, tmp_path, ray_local, monkeypatch):
    from ctal.batching import PretrainBatches
    from ctal.config import DataConfig
    from ctal.data import list_shards, open_dataset, read_report
    from ctal.distributed.preprocess import run_preprocess
    from ctal.preprocess import check_output

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    out = f"file://{tmp_path}/data"
    cfg = DataConfig(vocab_size=300, rows_per_shard=2)
    report = run_preprocess("csv", manifest, out, cfg, verbose=False)
    assert report["counts"] == {"in": 7, "written": 6, "quarantined": 1,
                                "quarantined_by_reason": {"missing_file": 1}, "text_truncated": 0}
    shards = list_shards(out)
    assert shards and all(s.startswith(out + "/part-") for s in shards)
    assert sum(s["rows"] for s in read_report(out)["shards"]) == 6 == open_dataset(out).read().num_rows
    assert sorted(storage.listdir(out)) == sorted([storage.name(s) for s in shards]
                                                   + ["manifest.json", "quarantine.parquet", "report.json", "tokenizer"])
    assert open_dataset(out).tokenizer.vocab_size > 5  # the tokenizer, fetched into the cache, hashes right
    assert PretrainBatches(out, rank=0, world_size=1, seed=0, batch_size=2).batches_per_epoch == 3

    with pytest.raises(FileExistsError, match="already exists"):
        check_output(out)
    storage.move(shards[0], f"{out}/part-99999999.parquet")  # a shard the next run does not write
    run_preprocess("csv", manifest, out, cfg, overwrite=True, verbose=False)
    assert not storage.exists(f"{out}/part-99999999.parquet")  # the old set is gone, not merged
    assert {storage.name(s) for s in list_shards(out)} == {s["file"] for s in read_report(out)["shards"]}
    assert open_dataset(out).read().num_rows == 6
    storage.write_text(f"file://{tmp_path}/foreign/notes.txt", "mine")
    with pytest.raises(FileExistsError, match="not a ctal data set"):
        check_output(f"file://{tmp_path}/foreign", overwrite=True)


def test_a_sweep_in_a_file_uri_publishes_its_results_there_and_resumes(tmp_path, ray_local, monkeypatch, capsys):
    from tiny_data import write_tiny_dataset

    from ctal.config import FinetuneConfig, SweepConfig
    from ctal.distributed.tune import run_sweep
    from ctal.search_space import parse_search_space

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    data = write_tiny_dataset(tmp_path / "data", n=24, splits=("train", "dev", "test"))
    cfg = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                      [*NARROW, "task=sentiment", f"data=file://{data}", "epochs=1", "batch_size=8", "max_frames=80"])
    opts = SweepConfig(search="grid", scheduler="fifo", storage=f"file://{tmp_path}/tune", name="s", verbose=0)
    result = run_sweep(cfg, parse_search_space({"lr": 1e-3}), opts)
    exp = f"file://{tmp_path}/tune/s"
    assert result.experiment == exp and result.best_checkpoint == f"{exp}/best_checkpoint"
    names = storage.listdir(exp)
    assert {"sweep.json", "results.csv", "results.md", "best_checkpoint"} <= set(names)
    assert any(n.startswith("trial_") for n in names)
    assert "tokenizer.json" in storage.listdir(f"{result.best_checkpoint}/tokenizer")  # from the file:// data

    spec = importlib.util.spec_from_file_location("pipeline_tune_finetune", REPO / "pipelines/tune_finetune.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    assert pipeline.main(["--resume", "--storage", f"file://{tmp_path}/tune", "--name", "s"]) == 0
    assert f"best checkpoint: {exp}/best_checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("there", ["file", "dir", "link"])
def test_publishing_over_a_file_dir_or_link_leaves_no_hidden_leftover(tmp_path, there):
    """Issue 30 (weak): an --out that was a file left a hidden .old-* file beside the new directory."""
    src = tmp_path / "staging"
    src.mkdir()
    (src / "done.json").write_text("{}")
    dest = tmp_path / "out"
    if there == "file":
        dest.write_text("old")
    elif there == "dir":
        dest.mkdir()
        (dest / "x").write_text("old")
    else:
        (tmp_path / "elsewhere").mkdir()
        dest.symlink_to(tmp_path / "elsewhere")
    storage.publish_dir(src, dest, marker="done.json")
    assert sorted(p.name for p in dest.iterdir()) == ["done.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(["elsewhere"] if there == "link" else [])])
