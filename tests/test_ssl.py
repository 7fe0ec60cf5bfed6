"""The audio stream on a pretrained speech encoder's features (features.frontend=ssl, issue 31).

A tiny random WavLM saved with transformers' own classes (nothing downloaded) is the upstream:
Ray Data preprocessing writes its kept layers, which equal the encoder's own ``output_hidden_states``;
the model weighs them; pretraining, fine-tuning and embed run on them, and every stage refuses
frames of another front end or upstream before it starts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from ctal.config import ConfigError, DataConfig, FeatureConfig, FinetuneConfig, MaskingConfig, PretrainConfig, load_config
from ctal.data import open_dataset

REPO = Path(__file__).resolve().parents[1]
LAYERS = [0, 2]  # the CNN's projected output and the last of the tiny encoder's 2 layers
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=600",
          "model.max_position_embeddings=130"]


def ssl_config(upstream: Path, *extra) -> DataConfig:
    return load_config(DataConfig, [], ["vocab_size=300", "features.frontend=ssl", f"features.ssl_model={upstream}",
                                        f"features.ssl_layers=[{','.join(map(str, LAYERS))}]", *extra])


@pytest.fixture(scope="module")
def upstream(ssl_models, tmp_path_factory) -> Path:
    """This module's own copy of the tiny WavLM (one test changes its weights, then puts them back)."""
    return Path(shutil.copytree(ssl_models["wavlm"], tmp_path_factory.mktemp("up") / "wavlm"))


@pytest.fixture(scope="module")
def ssl_data(synthetic_corpus, upstream, ray_local, tmp_path_factory) -> Path:
    """The synthetic MOSEI corpus preprocessed by Ray Data with the SSL front end."""
    from ctal.distributed.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("ssl-data") / "mosei"
    run_preprocess("mosei", synthetic_corpus("mosei"), out, ssl_config(upstream), verbose=False)
    return out


@pytest.fixture(scope="module")
def pretrained(ssl_data, tmp_path_factory) -> Path:
    """A few pretraining steps on the SSL features, in process (no Ray): the newest checkpoint."""
    from ctal.checkpoint import latest_checkpoint
    from ctal.pretrain import pretrain_loop, prepare

    storage = tmp_path_factory.mktemp("pt")
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [f"data={ssl_data}", f"storage_path={storage}", "run_name=ssl", "max_steps=4",
                       "checkpoint_every=4", "log_every=1", "batch_size=4", "num_workers=1", "lr=1e-3", *NARROW])
    out = pretrain_loop(prepare(cfg), run_dir=storage / "ssl", log=lambda _: None)
    assert np.isfinite(out["metrics"]["loss"]) and out["metrics"]["masked_acoustic_loss"] > 0
    return latest_checkpoint(storage / "ssl")


def finetune_config(data, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                       ["task=sentiment", f"data={data}", "epochs=1", "batch_size=8", "lr=1e-3", *NARROW, *extra])


@pytest.fixture(scope="module")
def finetuned(ssl_data, pretrained, tmp_path_factory) -> Path:
    from ctal.finetune import finetune

    out = tmp_path_factory.mktemp("ft")
    finetune(finetune_config(ssl_data, f"init={pretrained}"), out_dir=out, log=lambda _: None)
    return out / "best"


def test_preprocessing_writes_the_encoders_own_hidden_states_and_records_the_upstream(ssl_data, upstream,
                                                                                       synthetic_corpus):
    from transformers import AutoFeatureExtractor, AutoModel

    from ctal.corpora import read_corpus
    from ctal.features import to_waveform
    from ctal.upstream import upstream_hash

    ds = open_dataset(ssl_data)
    up = ds.report["upstream"]
    assert (up["architecture"], up["hash"], list(up["layers"]), up["hidden_size"], up["frame_shift_ms"]) == \
        ("wavlm", upstream_hash(upstream), LAYERS, 32, 20.0)
    c = ds.report["counts"]
    assert c["in"] == c["written"] + c["quarantined"] and c["written"] > 40
    field = pq.read_schema(ds.shards[0]).field("ssl")
    assert str(field.type) == "list<element: fixed_size_list<element: halffloat>[64]>"

    table = ds.read(columns=["id", "n_frames", "ssl"]).to_pylist()[:3]
    paths = {r["id"]: r["audio_path"] for r in read_corpus("mosei", str(synthetic_corpus("mosei")))}
    model = AutoModel.from_pretrained(upstream, local_files_only=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(upstream, local_files_only=True)
    for row in table:
        wav, sr = sf.read(paths[row["id"]], dtype="float32")
        x = extractor(to_waveform(wav, sr, 16000).numpy(), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            hidden = model(x.input_values, output_hidden_states=True).hidden_states
        ref = torch.cat([hidden[k][0] for k in LAYERS], dim=-1).numpy()
        stored = np.asarray(row["ssl"], dtype=np.float32)
        assert stored.shape == ref.shape == (row["n_frames"], 64)
        np.testing.assert_allclose(stored, ref, rtol=2e-3, atol=2e-3)  # float16 storage


def test_an_utterance_the_encoder_cannot_take_is_quarantined_with_its_reason(upstream, tmp_path):
    """Too short for one 20 ms frame (once min_duration_s lets it through); one the encoder fails on
    goes alone, its batch retried utterance by utterance."""
    from ctal.featurize import featurize_rows
    from ctal.tokenizer import train_bpe_tokenizer
    from ctal.upstream import Upstream

    tok = train_bpe_tokenizer(["a cat sat on the mat"] * 4, 300, tmp_path / "tok", model_max_length=64)
    rows = []
    for i, seconds in enumerate((0.01, 0.5, 0.7, 0.9)):
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(tmp_path / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio_path": str(tmp_path / f"u{i}.wav"), "text": "a cat sat"})
    cfg = ssl_config(upstream, "min_duration_s=0")
    real = Upstream(cfg.features.ssl_model, cfg.features.ssl_layers)

    class FailsOnTheLongest:
        info = real.info

        def __call__(self, waves):
            if any(len(w) == 0.9 * 16000 for w in waves):
                raise RuntimeError("CUDA out of memory (pretend)")
            return real(waves)

    out = featurize_rows(rows, tok, cfg, FailsOnTheLongest())
    assert out[0][0] is None and out[0][1]["reason"] == "too_short" and "wavlm frame" in out[0][1]["detail"]
    assert [r is not None for r, _ in out[1:]] == [True, True, False]
    assert out[3][1]["reason"] == "upstream_failed" and "out of memory" in out[3][1]["detail"]
    np.testing.assert_array_equal(out[1][0]["ssl"], real([sf.read(rows[1]["audio_path"], dtype="float32")[0]])[0])


def test_pretraining_on_ssl_features_weighs_the_kept_layers_and_records_the_upstream(pretrained, ssl_data):
    from ctal.checkpoint import read_state
    from ctal.model import CTALForPretraining

    model = CTALForPretraining.from_pretrained(pretrained)
    assert (model.config.audio_dim, model.config.audio_layers) == (64, 2)
    emb = model.audio.embeddings
    assert emb.layer_weights.shape == (2,) and emb.projection.in_features == 32
    assert not torch.equal(emb.layer_weights.detach(), torch.zeros(2))  # trained, from uniform
    state = read_state(pretrained)
    assert state["frontend"] == "ssl" and state["upstream"] == open_dataset(ssl_data).report["upstream"]


def test_the_weighted_sum_is_a_softmax_over_layers_and_reads_one_layers_width():
    from ctal.model import AudioEmbeddings, CTALConfig

    cfg = CTALConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, audio_dim=3 * 16, audio_layers=3,
                     hidden_dropout_prob=0.0)
    emb = AudioEmbeddings(cfg).eval()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        emb.layer_weights.copy_(torch.tensor([0.0, 30.0, 0.0]))  # all but layer 1 vanish
        only_1 = emb.dropout(emb.LayerNorm(emb.projection(x[..., 16:32]) + emb.position_embeddings(torch.arange(5))))
        torch.testing.assert_close(emb(x), only_1, atol=1e-5, rtol=1e-5)
    emb.layer_weights.data.zero_()
    emb(x).sum().backward()
    assert emb.layer_weights.grad is not None and emb.layer_weights.grad.abs().sum() > 0


def test_mask_spans_keep_their_duration_at_20_ms_frames():
    from ctal.masking import spans_at

    m = MaskingConfig()
    assert spans_at(m, 10.0) is m
    assert (spans_at(m, 20.0).span_min, spans_at(m, 20.0).span_max) == (10, 25)
    assert spans_at(MaskingConfig(span_min=1, span_max=1), 40.0).span_min == 1


def test_finetuning_and_embed_run_on_the_checkpoints_upstream(finetuned, ssl_data, upstream, synthetic_corpus,
                                                               ssl_models, tmp_path):
    from ctal.checkpoint import read_state
    from ctal.corpora import read_corpus
    from ctal.embed import embed_rows, load_for_embedding
    from ctal.upstream import UpstreamError

    assert read_state(finetuned)["upstream"] == open_dataset(ssl_data).report["upstream"]
    from ctal.data import TaskData
    from ctal.finetune import evaluate

    metrics, _ = evaluate(finetuned, TaskData.load(ssl_data), role="test")
    assert np.isfinite(metrics["mae"])
    rows = read_corpus("mosei", str(synthetic_corpus("mosei")))[:4]
    model, tok, data_cfg = load_for_embedding(finetuned)
    assert data_cfg.features.frontend == "ssl" and data_cfg.features.ssl_layers == LAYERS
    table, bad = embed_rows(model, rows, tok, data_cfg=data_cfg)
    assert table.num_rows == 4 and not bad

    moved = Path(shutil.copytree(upstream, tmp_path / "elsewhere"))  # the checkpoint on another machine
    assert load_for_embedding(finetuned, ssl_model=moved)[2].features.ssl_model == str(moved)
    with pytest.raises(UpstreamError, match="hashes to"):
        load_for_embedding(finetuned, ssl_model=ssl_models["hubert"])

    weights = next(upstream.glob("*.safetensors"))
    kept = weights.read_bytes()
    try:
        weights.write_bytes(kept + b"\0")  # another upstream at the recorded path: refused, not used
        with pytest.raises(UpstreamError, match="hashes to .* not .* as recorded"):
            load_for_embedding(finetuned)
    finally:
        weights.write_bytes(kept)


def test_a_checkpoint_refuses_frames_of_another_front_end_or_upstream_saying_how_to_preprocess(
        pretrained, ssl_data, synthetic_data, tmp_path):
    from ctal.finetune import prepare

    with pytest.raises(ValueError) as e:  # filterbank data under an SSL checkpoint
        prepare(finetune_config(synthetic_data("mosei"), f"init={pretrained}"))
    said = str(e.value)
    assert "trained on features.frontend=ssl frames of wavlm" in said and "features.frontend=kaldi frames" in said
    assert "features.ssl_model=" in said and "features.ssl_layers=[0,2]" in said

    other = tmp_path / "other"  # frames of the same shape, as if from another upstream
    shutil.copytree(ssl_data, other)
    report = json.loads((other / "report.json").read_text())
    report["upstream"].update(architecture="hubert", hash="0" * 64)
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"frames of wavlm sha256 \w{12}…, layers \[0, 2\], the data set holds "
                                         r"features.frontend=ssl frames of hubert sha256 000000000000…"):
        prepare(finetune_config(other, f"init={pretrained}"))


@pytest.mark.parametrize("extra, message", [
    (["features.frontend=ssl"], "features.frontend=ssl needs features.ssl_model=DIR"),
    (["features.ssl_layers=[1]"], "features.ssl_layers is for features.frontend=ssl"),
    (["features.frontend=ssl", "features.ssl_model=x", "features.ssl_num_gpus=-1"], "ssl_num_gpus=-1"),
])
def test_ssl_settings_are_checked_with_the_config(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DataConfig, [], extra)
    assert FeatureConfig().frontend == "kaldi"


@pytest.mark.parametrize("option, message", [
    ("features.ssl_model={missing}", "does not exist|not a directory|local folder"),
    ("features.ssl_layers=[7]", "ssl_layers"),
])
def test_preprocessing_refuses_a_bad_upstream_before_ray(run_recipe, upstream, synthetic_corpus, tmp_path,
                                                         option, message):
    import re

    args = ["--corpus", "mosei", "--root", synthetic_corpus("mosei"), "--out", tmp_path / "out",
            "features.frontend=ssl", f"features.ssl_model={upstream}",
            option.format(missing=tmp_path / "no-such-model")]
    code, err = run_recipe("preprocess", *args)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_text_init_and_an_ssl_front_end_start_both_streams_pretrained(upstream, synthetic_corpus, tmp_path):
    """MiniLM (the test extra) as the text stream, the WavLM's features as the audio input: the data
    tokenized with MiniLM's vocabulary and featurized by the upstream (no Ray), one pretraining step."""
    from test_hf import minilm_dir
    from transformers import AutoModel

    from ctal.corpora import read_corpus
    from ctal.data import write_dataset
    from ctal.featurize import featurize_rows, load_upstream
    from ctal.model import CTALForPretraining
    from ctal.pretrain import pretrain_loop, prepare
    from ctal.preprocess import resolve_upstream
    from ctal.tokenizer import load_tokenizer

    hf_dir = minilm_dir()  # skips without the test extra
    tok = load_tokenizer(hf_dir)
    cfg, record = resolve_upstream(ssl_config(upstream, f"tokenizer={hf_dir}"))
    rows = [dict(r, split="train") for r in read_corpus("mosei", str(synthetic_corpus("mosei")))[:8]]
    records = [r for r, _ in featurize_rows(rows, tok, cfg, load_upstream(cfg.features, record)) if r is not None]
    write_dataset(tmp_path / "data", records, tok, corpus="mosei", source=str(hf_dir),
                  features=asdict(cfg.features), upstream=record)
    run = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [f"data={tmp_path / 'data'}", f"storage_path={tmp_path}", "run_name=both", f"model.text_init={hf_dir}",
                       "model.num_audio_layers=1", "max_steps=1", "checkpoint_every=1", "batch_size=2",
                       "num_workers=1", "lr=1e-12", "model.max_audio_positions=600"])
    pretrain_loop(prepare(run), run_dir=tmp_path / "both", log=lambda _: None)
    model = CTALForPretraining.from_pretrained(next((tmp_path / "both" / "checkpoints").iterdir()))
    assert (model.config.audio_dim, model.config.audio_layers, model.config.hidden_size) == (64, 2, 384)
    minilm = AutoModel.from_pretrained(hf_dir, local_files_only=True)
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight,
                               atol=1e-6, rtol=0)
