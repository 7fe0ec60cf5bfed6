"""Run manifests (ctal.manifest): true fields, the dirty flag, start and end times, in run
directories, checkpoints and data sets, on paths and URIs alike."""
import json
import os
import platform
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ctal import checkpoint, manifest, storage
from ctal.config import DataConfig, FinetuneConfig, PretrainConfig, load_config
from tiny_data import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1"]


def git(root, *args) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(params=["path", "file_uri"])
def location(request, tmp_path):
    return str(tmp_path / "run") if request.param == "path" else (tmp_path / "run").as_uri()


def test_the_fields_are_those_of_this_process_and_checkout():
    import torch

    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"], ["max_steps=7"])
    m = manifest.collect("pretraining", cfg)
    if manifest.PACKAGE_ROOT.parent != REPO:
        pytest.skip(f"ctal is imported from {manifest.PACKAGE_ROOT}, not this checkout")
    assert m["ctal"]["commit"] == git(REPO, "rev-parse", "HEAD")
    assert m["ctal"]["dirty"] is bool(git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert m["versions"]["python"] == platform.python_version()
    assert torch.__version__.startswith(m["versions"]["torch"])
    import transformers
    assert m["versions"]["transformers"] == transformers.__version__
    assert m["versions"]["ray"] == metadata.version("ray")
    assert m["config"] == asdict(cfg) and m["config"]["max_steps"] == 7
    assert m["machine"]["cpu_count"] == os.cpu_count() and m["machine"]["cpu"]
    assert m["machine"]["host"] == platform.node() and isinstance(m["machine"]["gpus"], list)


def test_the_commit_and_dirty_flag_follow_a_git_checkout(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "ctal").mkdir(parents=True)
    (repo / "ctal" / "model.py").write_text("WIDTH = 1\n")
    for args in (["init", "-q"], ["add", "."],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first"]):
        git(repo, *args)
    clean = manifest.code_version(repo / "ctal")
    assert clean["commit"] == git(repo, "rev-parse", "HEAD") and clean["dirty"] is False
    (repo / "ctal" / "scratch.py").write_text("")  # untracked: not a change of the code that ran
    assert manifest.code_version(repo / "ctal")["dirty"] is False
    (repo / "ctal" / "model.py").write_text("WIDTH = 2\n")
    assert manifest.code_version(repo / "ctal")["dirty"] is True
    # an installed copy inside a work tree (a venv in the checkout) is not that checkout
    inner = repo / "venv" / "site-packages" / "ctal"
    inner.mkdir(parents=True)
    assert manifest.code_version(inner)["commit"] == manifest.NO_GIT
    assert manifest.code_version(tmp_path / "elsewhere")["commit"] == manifest.NO_GIT  # not a repository


def test_a_run_writes_its_start_then_its_end_and_keeps_earlier_attempts(location, monkeypatch):
    monkeypatch.setenv(manifest.COMMAND_ENV, "ctal pretrain --data d")
    with manifest.recorded_run(location, "pretraining", {"lr": 1e-3}) as run:
        during = manifest.read(location)
        assert during["status"] == "running" and during["started_at"] and during["ended_at"] is None
        assert manifest.run_info()["manifest"] == storage.join(location, manifest.MANIFEST_FILE)
        run["outputs"] = {"checkpoint": "c"}
    done = manifest.read(location)
    assert done["status"] == "finished" and done["ended_at"] >= done["started_at"]
    assert done["outputs"] == {"checkpoint": "c"} and done["command"] == "ctal pretrain --data d"
    assert done["config"] == {"lr": 1e-3} and manifest.run_info() is None

    with pytest.raises(RuntimeError), manifest.recorded_run(location, "pretraining"):
        raise RuntimeError("worker died\nlong traceback")
    failed = manifest.read(location)
    assert failed["status"] == "failed" and failed["ended_at"] and failed["error"] == "RuntimeError: worker died"
    assert [p["status"] for p in failed["previous"]] == ["finished"]  # the resumed attempt stays visible


def test_every_checkpoint_carries_a_manifest_that_names_its_run(tmp_path, monkeypatch):
    from ctal.pretrain import launch_local

    data = write_tiny_dataset(tmp_path / "data", n=16)
    monkeypatch.setenv(manifest.COMMAND_ENV, "python pipelines/pretrain.py --data d")
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [*NARROW, f"data={data}", "max_frames=100", "max_steps=2", "checkpoint_every=1",
                       "batch_size=4", "bucket_pool_rows=16", "log_every=1"])
    run_dir = tmp_path / "run"
    launch_local(cfg, run_dir, num_workers=1)
    run = manifest.read(run_dir)
    assert run["status"] == "finished" and run["ended_at"] and run["config"]["max_steps"] == 2
    steps = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-00000001", "step-00000002"]
    for step in steps:
        m = manifest.read(step)
        assert m["kind"] == "pretraining" and m["written_at"] and m["config"]["max_steps"] == 2
        assert m["run"]["manifest"] == str(run_dir / manifest.MANIFEST_FILE)
        assert m["command"] == "python pipelines/pretrain.py --data d" and m["ctal"] == run["ctal"]
        assert manifest.MANIFEST_FILE in checkpoint.verify(step)["files"]  # covered by the hashes
        assert "[manifest.json](manifest.json)" in (step / checkpoint.CARD_FILE).read_text()


def test_a_preprocessed_data_set_holds_its_manifest_and_the_report_links_it(tmp_path, ray_local):
    # A URI output: the manifest must be uploaded before report.json (a local output is renamed into
    # place whole; tests/test_install.py's demo checks that one).
    from ctal.distributed.preprocess import run_preprocess

    location = (tmp_path / "data").as_uri()
    lines = ["id,audio_path,text,speaker,split"]
    for i in range(3):
        t = np.arange(16000) / 16000
        sf.write(tmp_path / f"u{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), 16000)
        lines.append(f"u{i},u{i}.wav,utterance number {i},spk{i},train")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    report = run_preprocess("csv", tmp_path / "manifest.csv", location, DataConfig(vocab_size=300),
                            verbose=False)
    assert report["manifest"] == manifest.MANIFEST_FILE
    m = manifest.read(location)
    assert m["kind"] == "preprocessing" and m["status"] == "finished"
    assert m["started_at"] <= m["ended_at"] and m["config"]["data_config"]["vocab_size"] == 300
    assert json.loads(storage.read_text(storage.join(location, "report.json")))["manifest"] == "manifest.json"


def test_evaluate_out_and_embed_record_their_runs_beside_their_outputs(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import torch

    from ctal.finetune import finetune
    from ctal.model import CTALConfig, CTALForSequenceClassification
    from ctal.tokenizer import train_bpe_tokenizer
    from pipelines.embed import main as embed_main
    from pipelines.evaluate import main as evaluate_main

    monkeypatch.setenv(manifest.COMMAND_ENV, "ctal evaluate")
    data = write_tiny_dataset(tmp_path / "data", n=24, splits=("train", "dev", "test"))
    cfg = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                      [*NARROW, "task=sentiment", f"data={data}", "max_frames=80", "epochs=1", "batch_size=4"])
    finetune(cfg, out_dir=tmp_path / "ft", log=lambda _: None)
    out = tmp_path / "eval"
    assert evaluate_main(["--task", "sentiment", "--checkpoint", str(tmp_path / "ft" / "best"), "--out", str(out)]) == 0
    m = manifest.read(out)
    assert m["kind"] == "evaluation" and m["status"] == "finished" and m["command"] == "ctal evaluate"
    assert m["config"]["split"] == "test"
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) >= {"mae", "corr", "acc2"}
    assert evaluate_main(["--task", "sentiment", "--checkpoint", str(tmp_path / "ft" / "best"), "--out", str(out)]) == 0
    # issue 30: --out the checkpoint itself wrote a manifest into it, and every tool called it damaged
    best = tmp_path / "ft" / "best"
    before = {p: p.read_bytes() for p in best.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--task", "sentiment", "--checkpoint", str(best), "--out", str(best)])
    assert e.value.code == 2
    assert {p: p.read_bytes() for p in best.rglob("*") if p.is_file()} == before

    sf.write(tmp_path / "u.wav", (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    (tmp_path / "pairs.csv").write_text("id,audio_path,text\nu,u.wav,the cat sat\n")
    tok = train_bpe_tokenizer(["the cat sat"] * 5, vocab_size=300, out_dir=tmp_path / "ckpt" / "tokenizer")
    torch.manual_seed(0)
    CTALForSequenceClassification(CTALConfig(
        vocab_size=len(tok), hidden_size=32, num_attention_heads=4, intermediate_size=64, num_text_layers=1,
        num_audio_layers=1, num_labels=2, max_audio_positions=400)).save_pretrained(tmp_path / "ckpt")
    emb = tmp_path / "out" / "emb.parquet"
    assert embed_main(["--checkpoint", str(tmp_path / "ckpt"), "--manifest", str(tmp_path / "pairs.csv"),
                       "--out", str(emb)]) == 0
    assert pq.read_table(emb).num_rows == 1
    m = manifest.read(emb.parent, "emb.manifest.json")  # beside the file it describes, not a folder's
    assert m["kind"] == "embed" and m["status"] == "finished" and m["config"]["out"] == str(emb)
