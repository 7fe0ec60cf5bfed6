"""Waveforms in Parquet and the upstream inside the fine-tuning model (issue 28): tiny random encoders
(``ssl_models``), the synthetic corpus."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from ctal.config import ConfigError, DataConfig, load_config
from ctal.data import open_dataset

REPO = Path(__file__).resolve().parents[1]


def wave_config(*extra) -> DataConfig:
    return load_config(DataConfig, [], ["vocab_size=300", "features.frontend=waveform", *extra])


@pytest.fixture(scope="module")
def wave_data(synthetic_corpus, ray_local, tmp_path_factory) -> Path:
    """The synthetic MOSEI corpus preprocessed by Ray Data with the waveform front end."""
    from ctal.distributed.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("wave-data") / "mosei"
    run_preprocess("mosei", synthetic_corpus("mosei"), out, wave_config(), verbose=False)
    return out


def test_preprocessing_stores_the_resampled_audio_as_int16_pcm(wave_data, synthetic_corpus):
    from ctal.corpora import read_corpus
    from ctal.data import TaskData, to_pcm16
    from ctal.features import to_waveform

    ds = open_dataset(wave_data)
    assert ds.frontend == "waveform" and ds.audio_format.column == "waveform"
    assert ds.report["counts"]["written"] > 0 and "upstream" not in ds.report
    table = ds.read()
    assert table.schema.field("waveform").type == pa.list_(pa.int16())
    assert "fbank" not in table.column_names
    first = table.slice(0, 1).to_pylist()[0]
    row = next(r for r in read_corpus("mosei", str(synthetic_corpus("mosei"))) if r["id"] == first["id"])
    wav, sr = sf.read(row["audio_path"], dtype="float32")
    expected = to_pcm16(to_waveform(wav, sr, 16000).numpy())
    np.testing.assert_array_equal(np.asarray(first["waveform"], dtype=np.int16), expected)
    assert first["n_frames"] == len(expected)  # a waveform's n_frames counts samples

    data = TaskData.load(wave_data)
    assert data.audio.dtype == np.int16 and data.audio.shape[1] == 1
    assert int(data.n_frames.sum()) == len(data.audio)


def test_collate_gives_float_samples_cropped_at_max_frames():
    from ctal.batching import collate

    rows = [{"input_ids": np.array([0, 5, 2]), "waveform": np.array([16384, -32768, 1, 2, 3], dtype=np.int16)},
            {"input_ids": np.array([0, 2]), "waveform": np.array([100, 200], dtype=np.int16)}]
    b = collate(rows, max_frames=4, pad_token_id=1, frontend="waveform")
    assert b["frames"].shape == (2, 4, 1) and b["frames"].dtype == torch.float32
    assert b["frames"][0, :2, 0].tolist() == [0.5, -1.0]
    assert b["frame_mask"].sum(1).tolist() == [4, 2]


def test_a_waveform_shorter_than_one_window_is_quarantined(tmp_path):
    from ctal.featurize import featurize_rows
    from ctal.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a cat sat on the mat"] * 4, 300, tmp_path / "tok", model_max_length=64)
    rows = []
    for i, seconds in enumerate((0.01, 0.5)):
        t = np.arange(int(seconds * 22050)) / 22050
        sf.write(tmp_path / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 22050)
        rows.append({"id": f"u{i}", "audio_path": str(tmp_path / f"u{i}.wav"), "text": "a cat sat"})
    out = featurize_rows(rows, tok, wave_config("min_duration_s=0"))
    assert out[0][1]["reason"] == "too_short" and "window" in out[0][1]["detail"]
    rec = out[1][0]
    assert rec["waveform"].dtype == np.int16 and rec["n_frames"] == len(rec["waveform"]) == 8000


@pytest.mark.parametrize("extra, message", [
    (["features.dither=1"], "features.dither"),
    (["features.ssl_layers=[1]"], "features.ssl_layers is for features.frontend=ssl"),
])
def test_waveform_settings_are_checked_with_the_config(extra, message):
    with pytest.raises(ConfigError, match=message):
        wave_config(*extra)


def test_pretraining_refuses_waveforms_saying_what_to_pretrain_on(wave_data, tmp_path):
    from ctal.config import PretrainConfig
    from ctal.pretrain import prepare

    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"], [f"data={wave_data}", f"storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="features.frontend=ssl features of that upstream"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="model.audio_upstream is for fine-tuning on waveforms"):
        prepare(replace(cfg, model=replace(cfg.model, audio_upstream=str(tmp_path))))


# --------------------------------------------------------------------------------------------------
# the upstream inside the fine-tuning model

LAYERS = [0, 2]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=600",
          "model.max_position_embeddings=130"]


def finetune_config(data, upstream, *extra):
    from ctal.config import FinetuneConfig

    return load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                       ["task=sentiment", f"data={data}", "epochs=1", "batch_size=8", "lr=1e-3", *NARROW,
                        f"model.audio_upstream={upstream}", *extra])


@pytest.mark.parametrize("arch", ["wavlm", "data2vec-audio"])  # padded batches; one utterance at a time
def test_the_models_live_features_equal_the_stored_ones(ssl_models, arch):
    from ctal.batching import collate
    from ctal.model import CTALConfig, CTALForSequenceClassification
    from ctal.upstream import Upstream

    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(n) * 3000).astype(np.int16) for n in (4000, 7000, 5200)]
    model = CTALForSequenceClassification(CTALConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_text_layers=1, num_audio_layers=1,
        vocab_size=50, audio_upstream=str(ssl_models[arch]), audio_upstream_layers=LAYERS, num_labels=1)).eval()
    assert (model.config.audio_dim, model.config.audio_layers) == (64, 2)
    batch = collate([{"input_ids": np.array([0, 2]), "waveform": w} for w in waves], max_frames=10**6,
                    pad_token_id=1, frontend="waveform")
    with torch.no_grad():
        feats, mask = model.upstream(batch["frames"], batch["frame_mask"])
    stored = Upstream(ssl_models[arch], LAYERS)([w / 32768.0 for w in waves])
    for i, x in enumerate(stored):
        assert int(mask[i].sum()) == len(x)
        np.testing.assert_allclose(feats[i, :len(x)].numpy().astype(np.float16).astype(np.float32),
                                   x.astype(np.float32), rtol=2e-3, atol=2e-3)


def _weights(model, prefix):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("extra, upstream_moves, cnn_moves", [
    ([], False, False),
    (["freeze_upstream=false", "upstream_lr=1e-2"], True, False),
    (["freeze_upstream=false", "freeze_feature_encoder=false"], True, True),
    (["freeze_upstream=false", "upstream_checkpointing=true"], True, False),
])
def test_a_step_changes_the_upstream_only_when_not_frozen_and_the_cnn_only_when_asked(
        wave_data, ssl_models, extra, upstream_moves, cnn_moves):
    from ctal.finetune import _train_epoch, _FoldRun, audio_budget, build_model, prepare
    from ctal.optim import build_optimizer, build_scheduler
    from ctal.tasks import get_task

    cfg, data = prepare(finetune_config(wave_data, ssl_models["wavlm"], f"model.audio_upstream_layers={LAYERS}",
                                        "max_frames_per_batch=200", *extra))
    task = get_task(cfg.task)
    fold = task.folds(data.meta, cfg.fold, cfg.seed)[0]
    fold = replace(fold, train=fold.train[:6])  # one small step's worth
    classes = task.classes(data.meta, fold)
    model = build_model(cfg, task, classes, data)
    opt = build_optimizer(model, cfg)
    if upstream_moves:
        assert any(g["lr"] == (cfg.upstream_lr or cfg.lr) and g["params"] for g in opt.param_groups[2:])
    before_up, before_cnn = _weights(model, "upstream.model.encoder"), _weights(model, "upstream.model.feature_extractor")
    before_ctal = _weights(model, "audio.")
    bcfg = replace(cfg, **dict(zip(("max_frames", "max_frames_per_batch"),
                                   audio_budget(model, cfg.max_frames, cfg.max_frames_per_batch))))
    run = _FoldRun(fold, classes, model, opt, build_scheduler(opt, 0.0, 100), task.targets(data.meta, fold.train, classes))
    assert np.isfinite(_train_epoch(run, 0, data, bcfg, 1, 0, 1, torch.device("cpu")))
    changed = lambda before: any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert changed(before_ctal)
    assert changed(before_up) == upstream_moves
    assert changed(before_cnn) == cnn_moves
    assert model.upstream.training == upstream_moves  # frozen: eval mode whatever the model's
    assert model.upstream.model.is_gradient_checkpointing == ("upstream_checkpointing=true" in extra)


@pytest.fixture(scope="module")
def upstream_copy(ssl_models, tmp_path_factory) -> Path:
    """A copy of the tiny WavLM: the SSL features are made with it, and it is moved away to show that
    a fine-tuned checkpoint needs no folder."""
    import shutil

    return Path(shutil.copytree(ssl_models["wavlm"], tmp_path_factory.mktemp("up") / "wavlm"))


@pytest.fixture(scope="module")
def ssl_pretrained(synthetic_corpus, upstream_copy, ray_local, tmp_path_factory) -> Path:
    """A few pretraining steps on the stored SSL features of ``upstream_copy`` (layers LAYERS)."""
    from ctal.checkpoint import latest_checkpoint
    from ctal.config import PretrainConfig
    from ctal.distributed.preprocess import run_preprocess
    from ctal.pretrain import prepare, pretrain_loop

    data = tmp_path_factory.mktemp("ssl-data") / "mosei"
    run_preprocess("mosei", synthetic_corpus("mosei"), data, load_config(DataConfig, [], [
        "vocab_size=300", "features.frontend=ssl", f"features.ssl_model={upstream_copy}",
        f"features.ssl_layers=[{','.join(map(str, LAYERS))}]"]), verbose=False)
    storage = tmp_path_factory.mktemp("pt")
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [f"data={data}", f"storage_path={storage}", "run_name=ssl", "max_steps=2",
                       "checkpoint_every=2", "log_every=1", "batch_size=4", "num_workers=1", "lr=1e-3", *NARROW])
    pretrain_loop(prepare(cfg), run_dir=storage / "ssl", log=lambda _: None)
    return latest_checkpoint(storage / "ssl")


def test_an_ssl_features_checkpoint_initialises_ctal_and_the_fine_tuned_upstream_travels_with_it(
        wave_data, ssl_pretrained, upstream_copy, synthetic_corpus, ssl_models, tmp_path):
    from ctal.checkpoint import read_state
    from ctal.corpora import read_corpus
    from ctal.data import TaskData
    from ctal.embed import embed_rows, load_for_embedding
    from ctal.finetune import build_model, evaluate, finetune, prepare
    from ctal.model import CTALForPretraining, CTALForSequenceClassification
    from ctal.tasks import get_task

    # the upstream's layers default to those the checkpoint was pretrained on
    cfg, data = prepare(finetune_config(wave_data, upstream_copy, f"init={ssl_pretrained}",
                                        "freeze_upstream=false", "upstream_lr=1e-2", "max_frames_per_batch=400"))
    assert cfg.model.audio_upstream_layers == LAYERS
    task = get_task("sentiment")
    model = build_model(cfg, task, None, data)
    pre = CTALForPretraining.from_pretrained(ssl_pretrained)
    assert torch.equal(model.audio.embeddings.projection.weight, pre.audio.embeddings.projection.weight)
    assert torch.equal(model.audio.embeddings.layer_weights, pre.audio.embeddings.layer_weights)

    out = tmp_path / "ft"
    result = finetune(cfg, data=data, out_dir=out, log=lambda _: None)
    assert 0 < result.history[0]["padding_efficiency"] <= 1
    state = read_state(out / "best")
    assert state["frontend"] == "waveform" and state["upstream"]["layers"] == LAYERS
    again, _ = prepare(finetune_config(wave_data, upstream_copy, f"init={out / 'best'}"))  # fine-tuned further
    assert again.model.audio_upstream_layers == LAYERS
    with pytest.raises(ConfigError, match="runs its own upstream"):
        prepare(finetune_config(wave_data, ssl_models["hubert"], f"init={out / 'best'}"))

    moved = upstream_copy.rename(upstream_copy.parent / "gone")  # the folder is not needed any more
    try:
        loaded = CTALForSequenceClassification.from_pretrained(out / "best")
        assert loaded.config.audio_upstream is None and loaded.upstream is not None
        fresh = CTALForSequenceClassification(type(loaded.config)(**{**loaded.config.to_dict(), "num_labels": 1}))
        tuned = {k: v for k, v in loaded.state_dict().items() if k.startswith("upstream.model.encoder")}
        assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in tuned.items())
        from ctal.upstream import AudioUpstream
        original = AudioUpstream(loaded.config.audio_upstream_spec)
        original.load_folder(moved)
        assert any(not torch.equal(v, original.state_dict()[k[len("upstream."):]]) for k, v in tuned.items())
        metrics, _ = evaluate(out / "best", TaskData.load(wave_data), role="test")
        assert np.isfinite(metrics["mae"])
        rows = read_corpus("mosei", str(synthetic_corpus("mosei")))[:3]
        model, tok, data_cfg = load_for_embedding(out / "best")
        assert data_cfg.features.frontend == "waveform"
        table, bad = embed_rows(model, rows, tok, data_cfg=data_cfg)
        assert table.num_rows == 3 and not bad
    finally:
        moved.rename(upstream_copy)


@pytest.mark.parametrize("which, layers, message", [
    ("hubert", None, "model.audio_upstream: front end mismatch"),
    ("copy", "[2]", "model.audio_upstream: front end mismatch"),
    ("copy", "[7]", "model.audio_upstream_layers=\\[7\\]: \\[7\\] out of range"),
])
def test_another_upstream_than_the_checkpoints_is_refused_before_ray(wave_data, ssl_pretrained, upstream_copy,
                                                                      ssl_models, which, layers, message):
    from ctal.finetune import prepare

    up = upstream_copy if which == "copy" else ssl_models[which]
    extra = [f"model.audio_upstream_layers={layers}"] if layers else []
    with pytest.raises(ConfigError, match=message):
        prepare(finetune_config(wave_data, up, f"init={ssl_pretrained}", *extra))


def test_waveform_data_and_model_audio_upstream_go_together(wave_data):
    from ctal.config import FinetuneConfig, validate_finetune_config
    from ctal.finetune import prepare

    cfg = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"], ["task=sentiment", f"data={wave_data}"])
    with pytest.raises(ConfigError, match="model.audio_upstream=DIR"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="upstream_lr=0.001 is for a model with model.audio_upstream"):
        validate_finetune_config(replace(cfg, upstream_lr=1e-3))


def test_freeze_upstream_and_upstream_lr_are_sweepable_with_an_upstream_only(ssl_models):
    from ctal.config import FinetuneConfig
    from ctal.search_space import check_candidates, parse_search_space

    space = parse_search_space({"freeze_upstream": {"choice": [True, False]},
                                "upstream_lr": {"loguniform": [1e-5, 1e-3]}})
    with_upstream = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                                [f"model.audio_upstream={ssl_models['wavlm']}"])
    check_candidates(with_upstream, space)
    without = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"], [])
    with pytest.raises(ConfigError, match="freeze_upstream: freeze_upstream=False is for a model with model.audio_upstream"):
        check_candidates(without, space)


@pytest.mark.slow
def test_a_sweep_over_both_freeze_upstream_values_fine_tunes_and_evaluates_from_waveforms(
        wave_data, ssl_pretrained, upstream_copy, ray_local, tmp_path):
    from ctal.config import SweepConfig
    from ctal.distributed.tune import run_sweep
    from ctal.finetune import evaluate
    from ctal.search_space import parse_search_space

    cfg = finetune_config(wave_data, upstream_copy, f"init={ssl_pretrained}", "upstream_lr=1e-3",
                          "max_frames_per_batch=400")
    space = parse_search_space({"freeze_upstream": {"choice": [True, False]}})
    result = run_sweep(cfg, space, SweepConfig(search="grid", scheduler="fifo", storage=str(tmp_path),
                                               name="wave", verbose=0))
    table = result.table
    assert len(table) == 2 and set(table["status"]) == {"done"}
    assert set(table["freeze_upstream"]) == {True, False}
    metrics, _ = evaluate(result.best_checkpoint, role="test")
    assert np.isfinite(metrics["mae"])


def test_layerdrop_never_shifts_the_kept_layers_in_training(ssl_models, tmp_path):
    """transformers' LayerDrop skips layers in train mode, and with them their hidden states: off."""
    from ctal.upstream import AudioUpstream, save_random_upstream, upstream_spec

    folder = save_random_upstream(tmp_path / "w", "wavlm", num_layers=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layerdrop": 0.9}))
    up = AudioUpstream(upstream_spec(folder, [1, 3]))
    up.set_trainable(frozen=False)
    up.train()
    for _ in range(5):
        feats, mask = up(torch.randn(2, 4000, 1) * 0.1, torch.ones(2, 4000, dtype=torch.bool))
        assert feats.shape[-1] == 2 * 32
