"""Issue 15, the run side: what an adversarial new user did to fine-tuning, embedding, sweeps and
pretraining, scaled down. Each test reproduces one finding and checks the fix: embeddings featurized
as the checkpoint was trained (3), pretraining checkpoints refused by embed (4), DDP workers per
trial checked against the cluster (5), relative paths resolved before Ray (8), value ranges checked
before Ray (9), YAML errors in one line (10), embed's bad rows and arguments (11), damaged
checkpoints named (12).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from ctal import checkpoint
from ctal.checkpoint import STATE_FILE, CheckpointError, CheckpointStore, Part
from ctal.config import ConfigError, DataConfig, FeatureConfig, FinetuneConfig, PretrainConfig, SweepConfig, load_config
from ctal.corpora import read_manifest
from ctal.embed import embed_rows, load_for_embedding
from ctal.model import CTALConfig, CTALForPretraining
from ctal.tokenizer import load_tokenizer
from pipelines.embed import main as embed_main
from pipelines.evaluate import main as evaluate_main

ROOT = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=80", "epochs=1", "batch_size=8", "lr=1e-3"]
FORTY_MS = {"sample_rate": 16000, "num_mel_bins": 80, "frame_length_ms": 50.0, "frame_shift_ms": 40.0,
            "dither": 0.0, "frontend": "kaldi"}


def finetune_config(data, *overrides) -> FinetuneConfig:
    return load_config(FinetuneConfig, [ROOT / "configs" / "finetune.yaml"],
                       [*NARROW, "task=sentiment", f"data={data}", *overrides])


@pytest.fixture(scope="module")
def forty_ms(tiny_data, tmp_path_factory):
    """A tiny sentiment data set whose report says it was featurized with 40 ms frames (the demo's)."""
    data = tmp_path_factory.mktemp("h") / "data40"
    shutil.copytree(tiny_data, data)  # the shared one, copied: its report changes
    report = json.loads((data / "report.json").read_text())
    report["features"] = FORTY_MS
    report["data_config"] = {**DataConfig().__dict__, "features": FORTY_MS, "max_duration_s": 20.0}
    (data / "report.json").write_text(json.dumps(report, default=lambda o: o.__dict__))
    return data


@pytest.fixture(scope="module")
def finetuned(forty_ms, tmp_path_factory):
    """A fine-tuned checkpoint (one epoch, narrow model) of the 40 ms data set."""
    from ctal.finetune import finetune

    out = tmp_path_factory.mktemp("ft")
    finetune(finetune_config(forty_ms), out_dir=out, log=lambda s: None)
    return out / "best"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two tones with short texts, and one row whose text is far longer than 64 token positions."""
    d = tmp_path_factory.mktemp("m")
    for i in range(3):
        t = np.arange(16000) / 16000
        sf.write(d / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t)).astype(np.float32), 16000)
    long_text = " ".join(["the quick cat sat on the mat"] * 30)
    (d / "m.csv").write_text(f"id,audio_path,text\nu0,u0.wav,the cat sat\nu1,u1.wav,a dog ran\n"
                             f"long,u2.wav,{long_text}\n")
    return d / "m.csv"


def _pretraining_checkpoint(dest, data) -> Path:
    torch.manual_seed(0)
    tok = load_tokenizer(data / "tokenizer")
    model = CTALForPretraining(CTALConfig(vocab_size=len(tok), hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, num_text_layers=1, num_audio_layers=1,
                                          max_position_embeddings=66, max_audio_positions=200))
    store = CheckpointStore(dest)
    report = json.loads((data / "report.json").read_text())
    return Path(store.save(1, "pretraining", {"main": Part(model)}, tokenizer_dir=data / "tokenizer",
                           tokenizer_hash=report["tokenizer"]["hash"], state={"step": 1}))


# -- 3: embed featurizes as the checkpoint was trained ------------------------------------------------


def test_a_model_trained_on_40ms_frames_embeds_with_40ms_frames(finetuned, manifest):
    model, tok, data_cfg = load_for_embedding(finetuned)
    assert data_cfg.features == FeatureConfig(**FORTY_MS) and data_cfg.max_duration_s == 20.0
    rows = read_manifest(manifest)[:2]
    table, bad = embed_rows(model, rows, tok, data_cfg=data_cfg)
    assert table.num_rows == 2 and not bad
    forty = DataConfig(features=FeatureConfig(**FORTY_MS), text_normalization=data_cfg.text_normalization)
    ten = DataConfig(text_normalization=data_cfg.text_normalization)  # what embed used before: 10 ms
    vec = lambda t: np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert np.array_equal(vec(table), vec(embed_rows(model, rows, tok, data_cfg=forty)[0]))
    assert not np.allclose(vec(table), vec(embed_rows(model, rows, tok, data_cfg=ten)[0]), atol=1e-3)
    state = checkpoint.read_state(finetuned)
    assert state["data_config"]["features"] == FORTY_MS  # it travels in checkpoint.json


# -- 4: a pretraining checkpoint is refused -------------------------------------------------------


def test_embed_refuses_a_pretraining_checkpoint_instead_of_random_vectors(forty_ms, manifest, tmp_path, capsys):
    step = _pretraining_checkpoint(tmp_path / "run" / "checkpoints", forty_ms)
    with pytest.raises(ValueError, match="is a pretraining checkpoint: it has no trained fusion head"):
        load_for_embedding(step)
    bare = tmp_path / "bare"
    CTALForPretraining.from_pretrained(step).save_pretrained(bare)  # no checkpoint.json to say its kind
    (bare / "tokenizer").mkdir()
    for f in (step / "tokenizer").iterdir():
        (bare / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert embed_main(["--checkpoint", str(bare), "--manifest", str(manifest),
                       "--out", str(tmp_path / "e.parquet")]) == 2
    assert "not a fine-tuned checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e.parquet").exists()


# -- 5: DDP workers per trial against the cluster --------------------------------------------------


def test_workers_per_trial_are_checked_against_the_cluster():
    from ctal.distributed.train import ResourceError
    from ctal.distributed.tune import check_trial_resources

    with pytest.raises(ResourceError, match=r"workers_per_trial=12: each DDP worker needs a CPU, the Ray "
                                            r"cluster has 2 CPUs; use workers_per_trial <= 2"):
        check_trial_resources(SweepConfig(workers_per_trial=12), {"CPU": 2.0})
    with pytest.raises(ResourceError, match="workers_per_trial=2 with gpus_per_trial=1: each DDP worker "
                                            "needs a GPU of its own"):
        check_trial_resources(SweepConfig(workers_per_trial=2, gpus_per_trial=1), {"CPU": 8.0, "GPU": 4.0})
    with pytest.raises(ResourceError, match=r"cpus_per_trial=2 for the DDP workers plus 0.01 for the trial that "
                                            r"drives them is more than the Ray cluster's 2 CPUs; use cpus_per_trial <= 1.99"):
        check_trial_resources(SweepConfig(workers_per_trial=2, cpus_per_trial=2), {"CPU": 2.0})  # hung silently
    check_trial_resources(SweepConfig(workers_per_trial=2), {"CPU": 2.0})
    check_trial_resources(SweepConfig(workers_per_trial=2, gpus_per_trial=2), {"CPU": 8.0, "GPU": 2.0})


def test_a_sweep_of_more_workers_than_cpus_fails_before_tune_starts(ray_local, forty_ms, tmp_path):
    from ctal.distributed.train import ResourceError
    from ctal.distributed.tune import run_sweep
    from ctal.search_space import load_search_space

    space = load_search_space(ROOT / "search_spaces" / "sentiment.yaml").pin(["freeze_layers"])[0]  # 1-layer model
    sweep = SweepConfig(workers_per_trial=12, storage=str(tmp_path / "runs"), name="many")
    with pytest.raises(ResourceError, match="workers_per_trial=12"):
        run_sweep(finetune_config(forty_ms), space, sweep)
    assert not (tmp_path / "runs" / "many").exists()


# -- 8: relative --init / --data ----------------------------------------------------------------


def test_relative_init_and_data_are_resolved_and_checked_before_ray(forty_ms, tmp_path, monkeypatch):
    import pipelines.tune_finetune as recipe
    from ctal.finetune import prepare

    step = _pretraining_checkpoint(tmp_path / "pre" / "checkpoints", forty_ms)
    _copy(forty_ms, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg, data = prepare(finetune_config("data", "init=pre"))  # a run directory: its newest checkpoint
    assert cfg.data == str(tmp_path / "data") and cfg.init == str(step) and data.data_dir == cfg.data

    seen = []

    def fake_sweep(cfg, *a, **k):
        seen.append(cfg)
        raise RuntimeError("stopped before Tune")

    monkeypatch.setattr("ctal.distributed.console.init_ray", lambda *a, **k: None)
    monkeypatch.setattr(recipe, "run_sweep", fake_sweep)
    with pytest.raises(SystemExit) as e:
        recipe.main(["--task", "sentiment", "--data", "data", "--init", "pre", "--storage", "runs", *NARROW])
    assert e.value.code == 2 and seen[0].data == str(tmp_path / "data") and seen[0].init == str(step)
    with pytest.raises(FileNotFoundError, match=f"init={tmp_path}/nosuch is neither"):
        prepare(finetune_config("data", "init=nosuch"))
    seen.clear()
    with pytest.raises(SystemExit):
        recipe.main(["--task", "sentiment", "--data", "data", "--init", "nosuch", *NARROW])
    assert not seen  # refused before Ray


def test_a_size_other_than_the_init_checkpoints_is_refused_naming_the_key_before_ray(forty_ms, tmp_path, run_recipe):
    """With init the model is the checkpoint's size: a model.* size given otherwise is refused naming
    the key, where it used to be dropped without a word."""
    from ctal.finetune import prepare

    step = _pretraining_checkpoint(tmp_path / "pre" / "checkpoints", forty_ms)
    assert prepare(finetune_config(forty_ms, f"init={step}"))[0].init == str(step)  # NARROW is its size
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64, but init=.* has hidden_size=32: "):
        prepare(finetune_config(forty_ms, f"init={step}", "model.hidden_size=64"))
    code, err = run_recipe("tune_finetune", "--task", "sentiment", "--data", forty_ms, "--init", step,
                           "--storage", tmp_path / "runs", *NARROW, "model.num_text_layers=2")
    assert code == 2 and "model.num_text_layers=2, but init=" in err and "has num_text_layers=1" in err, err


# -- 9: value ranges before Ray --------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("lr=-1", r"lr=-1\.0 is out of range: must be > 0"),
    ("model.num_attention_heads=0", r"model\.num_attention_heads=0 is out of range: must be >= 1"),
    ("model.num_attention_heads=3", r"model\.hidden_size=32 is not a multiple of model\.num_attention_heads=3"),
    ("epochs=0", r"epochs=0 is out of range: must be >= 1"),
    ("model.hidden_dropout_prob=1.5", r"model\.hidden_dropout_prob=1\.5 is out of range: must be in \[0, 1\)"),
])
def test_finetuning_values_out_of_range_fail_before_ray_naming_the_key(forty_ms, override, message):
    from ctal.finetune import prepare

    with pytest.raises(ConfigError, match=message):
        prepare(finetune_config(forty_ms, override))


def test_emotion_on_non_iemocap_data_and_an_empty_data_set_fail_before_ray(forty_ms, tmp_path):
    from ctal.data import write_dataset
    from ctal.finetune import prepare

    with pytest.raises(ValueError, match="emotion expects IEMOCAP splits Session1..Session5"):
        prepare(finetune_config(forty_ms, "task=emotion"))
    empty = tmp_path / "empty"
    write_dataset(empty, [], load_tokenizer(forty_ms / "tokenizer"), corpus="tiny", source="test")
    with pytest.raises(ValueError, match="holds no utterances"):
        prepare(finetune_config(empty))


@pytest.mark.parametrize("override, message", [
    ("lr=-1", r"lr=-1\.0 is out of range: must be > 0"),
    ("model.num_attention_heads=0", r"model\.num_attention_heads=0 is out of range"),
    ("model.hidden_size=64", r"model\.hidden_size=64 is not a multiple of model\.num_attention_heads=3"),
    ("split=nosuch", r"split='nosuch': the data set .* has no rows in it; its splits: dev \(8 rows\), test"),
    ("masking.span_max=10", r"masking\.span_max=10 is below masking\.span_min=20"),
])
def test_pretraining_values_out_of_range_fail_before_ray_naming_the_key(forty_ms, tmp_path, override, message):
    from ctal.pretrain import prepare

    heads = ["model.num_attention_heads=3"] if "hidden_size=64" in override else []
    cfg = load_config(PretrainConfig, [ROOT / "configs" / "pretrain.yaml", ROOT / "configs" / "narrow.yaml"],
                      [f"data={forty_ms}", f"storage_path={tmp_path}", override, *heads])
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)


def test_pretraining_an_empty_data_set_fails_before_ray(forty_ms, tmp_path):
    from ctal.data import write_dataset
    from ctal.pretrain import prepare

    write_dataset(tmp_path / "empty", [], load_tokenizer(forty_ms / "tokenizer"), corpus="tiny", source="test")
    with pytest.raises(ValueError, match="holds no utterances: nothing to pretrain on"):
        prepare(PretrainConfig(data=str(tmp_path / "empty"), storage_path=str(tmp_path)))


# -- 10: YAML errors in one line -------------------------------------------------------------------


def test_yaml_errors_name_the_file_or_override_and_the_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1.0e-4\nmodel:\n  hidden_size: [64\n  fusion: ctal\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid YAML at line \d+, column \d+: ") as e:
        load_config(FinetuneConfig, [bad])
    assert "\n" not in str(e.value)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=rf"^{binary}: not a UTF-8 text file \(byte 0x89 at offset 0\)"):
        load_config(FinetuneConfig, [binary])
    with pytest.raises(ConfigError, match=r"^override 'model\.hidden_size=\[1': line 1, column 21: expected"):
        load_config(FinetuneConfig, [], ["model.hidden_size=[1"])


def test_a_yaml_error_in_a_recipe_exits_2_with_one_line(tmp_path, capsys):
    import pipelines.tune_finetune as recipe

    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(SystemExit) as e:
        recipe.main(["--task", "sentiment", "--data", str(tmp_path), "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path / 'bad.yaml'}: invalid YAML at line 2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- 11: embed's bad rows and arguments -------------------------------------------------------------


def test_embed_reports_a_text_longer_than_the_positions_and_writes_the_rest(finetuned, manifest, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    assert embed_main(["--checkpoint", str(finetuned), "--manifest", str(manifest), "--out", str(out)]) == 0
    assert pq.read_table(out).column("id").to_pylist() == ["u0", "u1"]
    assert "long: text_too_long" in capsys.readouterr().out
    for argv, message in ((["--batch-size", "0", "--out", str(out)], "--batch-size 0: must be >= 1"),
                          (["--out", str(tmp_path)], f"--out {tmp_path} is a directory")):
        assert embed_main(["--checkpoint", str(finetuned), "--manifest", str(manifest), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


# -- 12: damaged checkpoints --------------------------------------------------------------------------


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_damaged_checkpoints_in_embed_and_evaluate_name_the_file(finetuned, manifest, tmp_path, capsys,
                                                                 monkeypatch):
    torn = _copy(finetuned, tmp_path / "torn")
    model = torn / "model.safetensors"
    model.write_bytes(model.read_bytes()[:300])
    garbage = _copy(finetuned, tmp_path / "garbage")
    (garbage / STATE_FILE).write_text("not json {")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((finetuned / f).read_bytes())
    (bare / "model.safetensors").write_bytes(b"\x80\x04garbage")
    for ckpt, named in ((torn, torn / "model.safetensors"), (garbage, garbage / STATE_FILE),
                        (bare, bare / "model.safetensors")):
        assert embed_main(["--checkpoint", str(ckpt), "--manifest", str(manifest),
                           "--out", str(tmp_path / "o.parquet")]) == 2
        err = capsys.readouterr().err
        assert str(named) in err and "damaged" in err, err
    for ckpt, named in ((torn, "model.safetensors"), (garbage, STATE_FILE)):
        with pytest.raises(SystemExit) as e:
            evaluate_main(["--task", "sentiment", "--checkpoint", str(ckpt)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and named in err and "damaged" in err, err
    monkeypatch.chdir(finetuned.parent)  # a relative --checkpoint works, and the intact one scores
    assert evaluate_main(["--task", "sentiment", "--checkpoint", "best"]) == 0


def test_a_rehashed_pickle_falls_back_and_all_damaged_checkpoints_stop_pretraining(forty_ms, tmp_path):
    from ctal.pretrain import CHECKPOINTS, prepare, pretrain_loop

    cfg = load_config(PretrainConfig, [ROOT / "configs" / "pretrain.yaml", ROOT / "configs" / "narrow.yaml"],
                      [f"data={forty_ms}", f"storage_path={tmp_path}", "run_name=r", "max_steps=4",
                       "checkpoint_every=2", "batch_size=4", "num_workers=1", "bucket_pool_rows=16", *NARROW[:7]])
    run = tmp_path / "r"
    pretrain_loop(cfg, run_dir=run, log=lambda _: None)
    steps = run / CHECKPOINTS
    assert checkpoint.read_state(steps / "step-00000004")["data_config"]["features"] == FORTY_MS

    # step 4's weights replaced by a pickle whose sha256 is written into checkpoint.json: still refused
    newest = steps / "step-00000004"
    torch.save({"x": torch.zeros(1)}, newest / "model.safetensors")
    state = json.loads((newest / STATE_FILE).read_text())
    state["files"]["model.safetensors"] = checkpoint._sha256(newest / "model.safetensors")
    (newest / STATE_FILE).write_text(json.dumps(state))
    with pytest.warns(RuntimeWarning, match="step-00000004 is damaged.*not a readable safetensors file"):
        pretrain_loop(cfg, run_dir=run, log=lambda _: None)  # resumed from step 2, finished again
    for d in steps.glob("step-*"):
        (d / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(RuntimeWarning, match="falling back"), \
            pytest.raises(CheckpointError, match="every checkpoint of this run is damaged.*stopping instead of "
                                                 "starting over from step 0"):
        pretrain_loop(cfg, run_dir=run, log=lambda _: None)
    with pytest.raises(CheckpointError, match="every checkpoint of this run is damaged"):
        prepare(cfg)  # a rerun is refused before Ray starts, too


# -- leftovers: a run that quarantines every utterance ------------------------------------------------


@pytest.mark.parametrize("uri", [False, True])
def test_a_run_that_quarantines_every_utterance_publishes_nothing_and_keeps_the_report(
        forty_ms, tmp_path, ray_local, capsys, uri):
    from pipelines.preprocess import main as preprocess_main

    (tmp_path / "m.csv").write_text("id,audio_path,text\na,gone_a.wav,the cat sat\nb,gone_b.wav,a dog ran\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        preprocess_main(["--corpus", "csv", "--root", str(tmp_path / "m.csv"),
                         "--out", f"file://{out}" if uri else str(out), f"tokenizer={forty_ms / 'tokenizer'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "Traceback" not in err and "error:" in err.splitlines()[-1], err
    assert "all 2 utterances were quarantined (missing_file: 2); nothing was published" in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # no data set, not even an empty one
    kept = pq.read_table(tmp_path / "out.quarantine.parquet").to_pydict()
    assert str(tmp_path / "out.quarantine.parquet") in err
    assert sorted(kept["id"]) == ["a", "b"] and set(kept["reason"]) == {"missing_file"}



# -- 17: local runs listen on the loopback interface only ---------------------------------------------

LISTENERS = """
import json, os, pathlib, sys, tempfile
import ray
import psutil  # (Ray ships it: ray/thirdparty_files)
import ray.train
from ctal.distributed.console import init_ray
from ctal.distributed.torch_backend import torch_trainer

def listening(procs):
    out = set()
    for p in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return sorted(out)

def worker(config):  # a Ray Train worker: gloo's sockets and, on rank 0, torch's TCP store
    import os, torch.distributed as dist
    dist.barrier()
    (pathlib.Path(config["out"]) / f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "listening": listening([psutil.Process()]), "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]]}))
    dist.barrier()

init_ray(num_cpus=2)  # as the pipelines start a local Ray
out = pathlib.Path(tempfile.mkdtemp())
torch_trainer(worker, train_loop_config={"out": str(out)},  # as ctal.distributed.train and .tune build theirs
              scaling_config=ray.train.ScalingConfig(num_workers=2),
              run_config=ray.train.RunConfig(storage_path=str(out / "runs"))).fit()
me = psutil.Process()
print(json.dumps({"ray": listening([me, *me.children(recursive=True)]), "auth": os.environ.get("RAY_AUTH_MODE"),
                  "workers": [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]}))
"""
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def local_listeners():
    """What a local Ray started like the pipelines' and a Ray Train run on it listen on (a process of
    its own: a second Ray instance must not start in the test process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run([sys.executable, "-c", LISTENERS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


@pytest.mark.slow  # a fresh local Ray and Train workers in a process of their own
def test_a_local_ray_and_its_train_workers_listen_on_loopback_only(local_listeners):
    found, stderr = local_listeners
    assert {name for _, _, name in found["ray"]} >= {"gcs_server", "raylet"}
    assert [s for s in found["ray"] if s[0] not in LOOPBACK] == []
    assert len(found["workers"]) == 2
    for w in found["workers"]:
        master_addr, master_port = w["master"]
        assert master_addr == "127.0.0.1"  # what torch's store and gloo connect to
        # gloo's sockets on the loopback interface (torch's store server: the next test)
        assert [s for s in w["listening"] if s[0] not in LOOPBACK and s[1] != int(master_port)] == []
    # a local Ray's token authentication (Ray's default) stays on; the console does not say so
    assert found["auth"] == "token" and "Token authentication" not in stderr


@pytest.mark.slow  # a fresh local Ray and Train workers in a process of their own
def test_torchs_rank0_store_listens_on_loopback_only(local_listeners):
    """torch binds its store server to every interface; ctal.rendezvous binds it to the node address."""
    found, _ = local_listeners
    port = int(found["workers"][0]["master"][1])
    store = [s for w in found["workers"] for s in w["listening"] if s[1] == port]
    assert store and all(s[0] in LOOPBACK for s in store)


RENDEZVOUS = """
import json, subprocess, sys
import ray  # noqa: F401  (puts Ray's psutil on the path)
import psutil
import torch, torch.distributed as dist
from ctal import rendezvous

port = rendezvous.serve_store("127.0.0.1")
peer = subprocess.Popen([sys.executable, "-c", f'''
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=1, world_size=2)
t = torch.tensor([2.0]); dist.all_reduce(t); dist.destroy_process_group()
'''])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
t = torch.tensor([1.0]); dist.all_reduce(t)
listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN})
dist.destroy_process_group(); rendezvous.release_store(port)
print(json.dumps({"port": port, "sum": t.item(), "listening": listening, "peer": peer.wait(timeout=120)}))
"""


def test_the_local_launchers_rendezvous_store_listens_on_loopback_only():
    """ctal.pretrain.launch_local's rank 0 (no Ray): the store torch's tcp:// rendezvous would bind to
    every interface shares ctal.rendezvous's loopback server instead, and the group still works."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", RENDEZVOUS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["sum"] == 3.0 and found["peer"] == 0
    assert found["port"] in {port for _, port in found["listening"]}
    assert [s for s in found["listening"] if s[0] not in LOOPBACK] == []
