"""One checkpoint format and store (ctal.checkpoint), one schedule (ctal.optim): the store on a local
path and on a ``file://`` URI through the same functions, falling back past a damaged checkpoint,
the tokenizer check for pretraining and fine-tuned checkpoints, and exact fine-tuning resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ctal import checkpoint, checkpoint_data, storage
from ctal.checkpoint import STATE_FILE, CheckpointStore, Part
from ctal.config import FinetuneConfig, PretrainConfig, load_config
from ctal.model import CTALConfig, CTALForPretraining
from ctal.optim import build_optimizer, build_scheduler, linear_warmup_decay
from ctal.tokenizer import tokenizer_hash

REPO = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66"]


@pytest.fixture(scope="module")
def tiny(tiny_data):
    return tiny_data  # conftest.py's, read-only


@pytest.fixture(scope="module")
def other_tokenizer(tiny, tmp_path_factory):
    """The same data set with a different tokenizer of the same vocabulary size (two ids swapped)."""
    copy = tmp_path_factory.mktemp("other") / "data"
    shutil.copytree(tiny, copy)
    path = copy / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    report = json.loads((copy / "report.json").read_text())
    report["tokenizer"]["hash"] = tokenizer_hash(copy / "tokenizer")
    (copy / "report.json").write_text(json.dumps(report))
    assert report["tokenizer"]["vocab_size"] == json.loads((tiny / "report.json").read_text())["tokenizer"]["vocab_size"]
    return copy


def _hash(data) -> str:
    return json.loads((Path(data) / "report.json").read_text())["tokenizer"]["hash"]


# -- the store ---------------------------------------------------------------------------------------


def _part(seed: int) -> Part:
    torch.manual_seed(seed)
    model = CTALForPretraining(CTALConfig(vocab_size=40, hidden_size=16, num_attention_heads=2,
                                          intermediate_size=32, num_text_layers=1, num_audio_layers=1,
                                          max_position_embeddings=20, max_audio_positions=30))
    opt = build_optimizer(model, PretrainConfig(lr=1e-3))
    sched = build_scheduler(opt, 0.5, 10)
    for _ in range(2):  # some optimizer state worth restoring
        model(**_batch()).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return Part(model, opt, sched)


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, 40, (2, 6), generator=g), "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "frames": torch.randn(2, 10, 160, generator=g), "frame_mask": torch.ones(2, 10, dtype=torch.bool),
            "mlm_labels": torch.randint(3, 40, (2, 6), generator=g),
            "acoustic_mask": torch.rand(2, 10, generator=g) < 0.3, "target_frames": torch.randn(2, 10, 160, generator=g)}


@pytest.fixture(params=["path", "file_uri"])
def store_root(request, tmp_path):
    return tmp_path / "ckpts" if request.param == "path" else f"file://{tmp_path}/ckpts"


def test_the_store_lists_writes_prunes_chooses_and_reads_a_path_and_a_uri_alike(store_root, tiny):
    store = CheckpointStore(store_root, keep=2)
    parts = {}
    for step in (1, 2, 3):
        parts[step] = _part(step)
        where = store.save(step, "pretraining", {"main": parts[step]}, tokenizer_dir=tiny / "tokenizer",
                           tokenizer_hash=_hash(tiny), state={"step": step})
        assert where == store.path(step) and storage.is_file(storage.join(where, STATE_FILE))
    assert [s for s, _ in store.list()] == [2, 3] and store.latest() == store.path(3)  # step 1 pruned
    assert isinstance(store.latest(), str if storage.is_uri(store_root) else Path)

    step, local = store.choose(log=lambda _: None)
    assert step == 3 and checkpoint.verify(local)["step"] == 3
    state = checkpoint.read_state(store.path(3))  # read without a download, path or URI
    assert state["kind"] == "pretraining" and state["models"] == {"main": "."}
    assert sorted(state["files"]) == sorted(["README.md", "config.json", "manifest.json", "model.safetensors",
                                             "optimizer.safetensors",
                                             *[f"tokenizer/{n}" for n in storage.listdir(tiny / "tokenizer")]])
    model = CTALForPretraining.from_pretrained(local)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in parts[3].model.state_dict().items())
    fresh = _part(99)
    checkpoint.load_training_state(local, fresh.optimizer, fresh.scheduler)
    saved, loaded = parts[3].optimizer.state_dict(), fresh.optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert all(torch.equal(loaded["state"][i][k], v) for i, s in saved["state"].items() for k, v in s.items())
    assert fresh.scheduler.state_dict()["last_epoch"] == 2 and fresh.scheduler.get_last_lr() == parts[3].scheduler.get_last_lr()
    checkpoint_data.check_tokenizer(local, _hash(tiny))


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_on_a_path_and_a_uri(store_root, tiny):
    store = CheckpointStore(store_root)
    for step in (1, 2, 3):
        store.save(step, "pretraining", {"main": _part(step)}, tokenizer_dir=tiny / "tokenizer",
                   tokenizer_hash=_hash(tiny), state={"step": step})
    storage.delete(storage.join(store.path(3), STATE_FILE))  # a write cut off before its marker
    model = Path(storage.local_path(store.path(2))) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:500])  # a torn write
    with pytest.warns(RuntimeWarning, match="step-00000002 is damaged.*falling back"):
        step, local = store.choose(log=lambda _: None)
    assert step == 1 and checkpoint.verify(local)["step"] == 1
    names = storage.listdir(store_root)
    assert [n for n in names if n.startswith("step-")] == ["step-00000001"]  # the cut-off one is gone
    assert any(n.startswith("corrupt-step-00000002-") for n in names)


def test_a_write_never_records_a_tokenizer_other_than_the_one_it_copies(tiny, other_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="hashes to"):
        checkpoint.write(tmp_path / "c", "pretraining", {"main": _part(0)}, tokenizer_dir=tiny / "tokenizer",
                         tokenizer_hash=_hash(other_tokenizer), state={})
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []  # no staging left behind


# -- the tokenizer check at --init, on resume and in evaluate ----------------------------------------


def _pretrain_cfg(data, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                       [*NARROW, f"data={data}", "max_frames=100", "max_steps=2", "checkpoint_every=2",
                        "batch_size=4", "bucket_pool_rows=16", *extra])


def _finetune_cfg(data, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                       [*NARROW, "task=sentiment", f"data={data}", "max_frames=80", "epochs=1", "batch_size=4",
                        "lr=1e-3", *extra])


def test_a_different_tokenizer_of_the_same_size_is_refused_for_both_kinds_of_checkpoint(tiny, other_tokenizer,
                                                                                      tmp_path):
    from ctal.data import TaskData
    from ctal.finetune import evaluate, finetune
    from ctal.pretrain import pretrain_loop

    quiet = dict(log=lambda _: None)
    pre = pretrain_loop(_pretrain_cfg(tiny), run_dir=tmp_path / "run", **quiet)["checkpoint"]
    ours, theirs = _hash(tiny)[:12], _hash(other_tokenizer)[:12]
    assert ours != theirs

    # a pretraining checkpoint: accepted at --init with its own tokenizer, refused with the other one
    finetune(_finetune_cfg(tiny, f"init={pre}"), out_dir=tmp_path / "ft", **quiet)
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{ours}.*{theirs}"):
        finetune(_finetune_cfg(other_tokenizer, f"init={pre}"), **quiet)
    # ... and on resume
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{ours}.*{theirs}"):
        pretrain_loop(_pretrain_cfg(other_tokenizer, "max_steps=4"), run_dir=tmp_path / "run", **quiet)

    # a fine-tuned checkpoint: at --init, on resume and in evaluate
    tuned = tmp_path / "ft" / "last"
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{ours}.*{theirs}"):
        finetune(_finetune_cfg(other_tokenizer, f"init={tuned}"), **quiet)
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{ours}.*{theirs}"):
        finetune(_finetune_cfg(other_tokenizer, "epochs=2"), resume_from=tuned, **quiet)
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{ours}.*{theirs}"):
        evaluate(tuned, TaskData.load(other_tokenizer), role="dev")


def test_finetuning_checkpoints_hold_no_pickle_and_resume_to_the_same_losses(tiny, tmp_path):
    from ctal.finetune import evaluate, finetune, fold_dirs, read_state

    cfg = _finetune_cfg(f"file://{tiny}", "epochs=3")  # a URI data set: the tokenizer comes from the cache
    kept = []

    def keep(metrics, where):  # what Tune does: copy the reported directory
        kept.append(metrics)
        shutil.copytree(where, tmp_path / f"epoch{metrics['epoch']}")

    finetune(cfg, report=keep, log=lambda _: None)
    first = tmp_path / "epoch1"
    assert sorted(p.name for p in first.iterdir()) == ["README.md", "checkpoint.json", "config.json", "manifest.json",
                                                       "model.safetensors", "optimizer.safetensors", "tokenizer"]
    assert checkpoint.verify(first)["epoch"] == 1 and read_state(first)["folds"] == ["main"]
    assert fold_dirs(first) == {"main": first}
    resumed = []
    finetune(cfg, resume_from=first, report=lambda m, _: resumed.append(m), log=lambda _: None)
    assert [m["epoch"] for m in resumed] == [2, 3]
    for got, want in zip(resumed, kept[1:]):
        assert (got["train_loss"], got["dev_mae"]) == (want["train_loss"], want["dev_mae"])
    metrics, _ = evaluate(f"file://{tmp_path}/epoch3", role="dev")  # a URI checkpoint, too
    assert metrics["mae"] == pytest.approx(kept[2]["dev_mae"], abs=1e-6)


# -- the schedule ------------------------------------------------------------------------------------


def test_the_schedule_is_hugging_faces_linear_warmup_and_decay():
    from transformers import get_linear_schedule_with_warmup

    for warmup, total in ((0, 10), (3, 10), (7, 100)):
        ref = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup, total)
        ours = linear_warmup_decay(warmup, total)
        assert [ours(s) for s in range(total + 2)] == [ref.lr_lambdas[0](s) for s in range(total + 2)]
    assert linear_warmup_decay(4, 10)(0) == 0.0  # step/warmup: no update at step 0, as HF


# -- one vocabulary across the journey ----------------------------------------------------------------


def test_a_mismatched_init_fails_before_ray_naming_both_hashes_and_the_fix(tiny, other_tokenizer, tmp_path,
                                                                           run_recipe):
    """The recipe refuses before Ray starts (not from inside every trial), and says how to mend it."""
    import time

    from ctal.pretrain import pretrain_loop

    pre = pretrain_loop(_pretrain_cfg(tiny), run_dir=tmp_path / "run", log=lambda _: None)["checkpoint"]
    argv = ["--task", "sentiment", "--data", str(other_tokenizer), "--init", str(pre),
            "--storage", str(tmp_path / "tune")]
    t0 = time.perf_counter()
    code, err = run_recipe("tune_finetune", *argv)
    assert code == 2, err
    assert f"{_hash(tiny)[:12]}" in err and f"{_hash(other_tokenizer)[:12]}" in err
    assert "python pipelines/preprocess.py" in err and f"tokenizer={pre}" in err
    assert time.perf_counter() - t0 < 120 and not (tmp_path / "tune").exists()


def test_preprocessing_takes_the_tokenizer_of_a_data_set_or_a_checkpoint(tiny, tmp_path):
    from dataclasses import replace

    from ctal.config import DataConfig
    from ctal.preprocess import resolve_tokenizer
    from ctal.pretrain import pretrain_loop
    from ctal.tokenizer import save_normalization

    # a data set: its verified tokenizer, and the normalization it was tokenized with (none recorded: as read)
    cfg = resolve_tokenizer(DataConfig(tokenizer=str(tiny)))
    assert (cfg.tokenizer, cfg.text_normalization) == (str(tiny / "tokenizer"), "none")
    with pytest.raises(ValueError, match="made for text_normalization=none, this run asks for release"):
        resolve_tokenizer(DataConfig(tokenizer=str(tiny), text_normalization="release"))
    # a pretraining checkpoint: its tokenizer/ (the data set's, copied), whose hash is the data set's
    pre = pretrain_loop(_pretrain_cfg(tiny), run_dir=tmp_path / "run", log=lambda _: None)["checkpoint"]
    cfg = resolve_tokenizer(DataConfig(tokenizer=str(pre)))
    assert Path(cfg.tokenizer) == Path(pre) / "tokenizer" and tokenizer_hash(cfg.tokenizer) == _hash(tiny)
    # a tokenizer folder with a recorded normalization: adopted; none anywhere: the authors' rule
    folder = tmp_path / "tok"
    shutil.copytree(tiny / "tokenizer", folder)
    assert resolve_tokenizer(DataConfig(tokenizer=str(folder))).text_normalization == "release"
    save_normalization(folder, "lower")
    assert resolve_tokenizer(replace(DataConfig(), tokenizer=str(folder))).text_normalization == "lower"
    assert resolve_tokenizer(DataConfig()).text_normalization == "release"


def test_every_checkpoint_carries_a_model_card_of_what_made_it(tiny, tmp_path, monkeypatch):
    from ctal.finetune import finetune
    from ctal.pretrain import pretrain_loop

    monkeypatch.setenv(checkpoint.COMMAND_ENV, "python pipelines/pretrain.py --data d --name n")
    pre = Path(pretrain_loop(_pretrain_cfg(tiny), run_dir=tmp_path / "run", log=lambda _: None)["checkpoint"])
    card = (pre / checkpoint.CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: ctal") and "# CTAL pretraining checkpoint" in card
    assert "| step | 2 |" in card and _hash(tiny) in card and str(tiny) in card
    assert "python pipelines/pretrain.py --data d --name n" in card and "mlm_loss" in card
    assert checkpoint.CARD_FILE in checkpoint.verify(pre)["files"]  # covered by the hashes like the rest
    monkeypatch.delenv(checkpoint.COMMAND_ENV)
    finetune(_finetune_cfg(tiny, f"init={pre}"), out_dir=tmp_path / "ft", log=lambda _: None)
    card = (tmp_path / "ft" / "best" / checkpoint.CARD_FILE).read_text()
    assert "# CTAL fine-tuned checkpoint: sentiment" in card and "| epoch | 1 |" in card and "dev_mae" in card
    assert "## How it was made" not in card  # no command recorded: none invented
