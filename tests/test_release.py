"""The authors' released checkpoints → ctal-ray (ctal.release), and the release's front end.

The release checkpoint here is written the way the authors' runner writes one (torch.save of the two
state dicts under Hugging Face RoBERTa names, Settings with the YAML and an argparse.Namespace), with
random tensors; the text stream is checked against transformers' own RobertaForMaskedLM loaded from
the same dict, the front end against a numpy/scipy reference written from its definition.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import savgol_filter

from ctal import checkpoint, checkpoint_data
from ctal.config import ConfigError, FeatureConfig, FinetuneConfig, load_config
from ctal.features import add_deltas, compute_fbank, model_frames
from ctal.model import CTALForPretraining
from ctal.release import ReleaseFormatError, convert_release, load_release_checkpoint

REPO = Path(__file__).resolve().parents[1]
H, FFN, HEADS, TEXT_POSITIONS, AUDIO_POSITIONS = 32, 64, 4, 40, 3000


class NotAllowed:
    """A type no release checkpoint needs: a file holding it must be refused, not unpickled."""


# -- a checkpoint in the release's format ------------------------------------------------------------


def write_bpe(out: Path) -> Path:
    """A byte-level BPE folder as the release ships one: vocab.json + merges.txt only."""
    from tokenizers import ByteLevelBPETokenizer

    from tiny_data import WORDS

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(out))
    return out


def _vocab_size(bpe_dir: Path) -> int:
    return len(json.loads((bpe_dir / "vocab.json").read_text()))


def _layer(prefix: str, g: torch.Generator, cross: bool) -> dict:
    """One RobertaLayer's state dict (with cross-attention for the acoustic encoder's)."""
    def linear(name: str, n_out: int, n_in: int) -> dict:
        return {f"{prefix}.{name}.weight": torch.randn(n_out, n_in, generator=g),
                f"{prefix}.{name}.bias": torch.randn(n_out, generator=g)}

    def layer_norm(name: str) -> dict:
        return {f"{prefix}.{name}.{p}": torch.randn(H, generator=g) for p in ("weight", "bias")}

    out = {}
    for block in ["attention"] + (["crossattention"] if cross else []):
        for proj in ("query", "key", "value"):
            out.update(linear(f"{block}.self.{proj}", H, H))
        out.update(linear(f"{block}.output.dense", H, H) | layer_norm(f"{block}.output.LayerNorm"))
    out.update(linear("intermediate.dense", FFN, H) | linear("output.dense", H, FFN) | layer_norm("output.LayerNorm"))
    return out


def release_checkpoint(vocab: int, seed: int = 0) -> dict:
    """What the release's runner saves, by RELEASE.md's key table (1 + 1 layers, hidden 32)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    words = r(vocab, H)
    semantic = {"roberta.embeddings.position_ids": torch.arange(TEXT_POSITIONS)[None],
                "roberta.embeddings.word_embeddings.weight": words,
                "roberta.embeddings.position_embeddings.weight": r(TEXT_POSITIONS, H),
                "roberta.embeddings.token_type_embeddings.weight": r(2, H),
                "roberta.embeddings.LayerNorm.weight": r(H), "roberta.embeddings.LayerNorm.bias": r(H),
                **_layer("roberta.encoder.layer.0", g, cross=False),
                "lm_head.dense.weight": r(H, H), "lm_head.dense.bias": r(H),
                "lm_head.layer_norm.weight": r(H), "lm_head.layer_norm.bias": r(H)}
    lm_bias = r(vocab)
    semantic.update({"lm_head.bias": lm_bias, "lm_head.decoder.weight": words, "lm_head.decoder.bias": lm_bias})
    am_bias = r(160)
    acoustic = {"acoustic.embeddings.position_ids": torch.arange(AUDIO_POSITIONS)[None],
                "acoustic.embeddings.position_embeddings.weight": r(AUDIO_POSITIONS, H),
                "acoustic.embeddings.token_type_embeddings.weight": r(2, H),
                "acoustic.embeddings.dense.weight": r(H, 160), "acoustic.embeddings.dense.bias": r(H),
                "acoustic.embeddings.LayerNorm.weight": r(H), "acoustic.embeddings.LayerNorm.bias": r(H),
                **_layer("acoustic.encoder.layer.0", g, cross=True),
                "am_head.dense.weight": r(H, H), "am_head.dense.bias": r(H),
                "am_head.layer_norm.weight": r(H), "am_head.layer_norm.bias": r(H),
                "am_head.decoder.weight": r(160, H), "am_head.bias": am_bias, "am_head.decoder.bias": am_bias}
    stream = {"hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": HEADS, "intermediate_size": FFN,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    config = {"semantic": {**stream, "vocab_size": vocab, "max_position_embeddings": TEXT_POSITIONS},
              "acoustic": {**stream, "audio_size": 160, "max_position_embeddings": AUDIO_POSITIONS,
                           "downsample_rate": 1, "is_decoder": True, "add_cross_attention": True},
              "runner": {"total_steps": 1000000}, "dataloader": {"train_set": ["train-clean-100"]}}
    return {"semantic_model": semantic, "acoustic_model": acoustic,
            "Optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0, 1]}]}, "Global_step": 1234,
            "Settings": {"Config": config, "Paras": argparse.Namespace(config="m2pretrain_base.yaml", seed=1337)}}


@pytest.fixture(scope="module")
def release(bpe_dir, tmp_path_factory):
    """(the dict, its file) of a checkpoint in the release's format."""
    ckpt = release_checkpoint(_vocab_size(bpe_dir))
    path = tmp_path_factory.mktemp("release") / "CTAL-Tiny.ckpt"
    torch.save(ckpt, path)
    return ckpt, path


@pytest.fixture(scope="module")
def converted(release, bpe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "ctal-release"
    convert_release(release[1], bpe_dir, out)
    return out


# -- loading ---------------------------------------------------------------------------------------


def test_the_release_format_loads_with_only_argparse_namespace_allowed(release):
    ckpt = load_release_checkpoint(release[1])
    assert isinstance(ckpt["Settings"]["Paras"], argparse.Namespace) and ckpt["Global_step"] == 1234
    torch.testing.assert_close(ckpt["semantic_model"]["lm_head.bias"], release[0]["semantic_model"]["lm_head.bias"])


def test_a_pickle_needing_another_type_is_refused_by_name_and_nothing_is_written(release, bpe_dir, tmp_path):
    ckpt = dict(release[0], Settings={**release[0]["Settings"], "Paras": NotAllowed()})
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ReleaseFormatError, match=rf"{NotAllowed.__module__}\.NotAllowed.*refusing"):
        load_release_checkpoint(path)
    with pytest.raises(ReleaseFormatError, match="NotAllowed"):
        convert_release(path, bpe_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"]


# -- converting ------------------------------------------------------------------------------------


def test_every_release_tensor_arrives_unchanged(release, converted):
    sem, ac = release[0]["semantic_model"], release[0]["acoustic_model"]
    model = CTALForPretraining.from_pretrained(converted)
    ours = model.state_dict()
    expected = {"mlm_head.bias": sem["lm_head.bias"], "acoustic_head.decoder.bias": ac["am_head.bias"],
                "mlm_head.decoder.weight": sem["roberta.embeddings.word_embeddings.weight"],
                "audio.embeddings.projection.weight": ac["acoustic.embeddings.dense.weight"]}
    for key, value in sem.items():
        if key.startswith("roberta.") and "position_ids" not in key:
            expected["text." + key.removeprefix("roberta.")] = value
        elif key.startswith("lm_head.") and key.split(".")[1] in ("dense", "layer_norm"):
            expected["mlm_head." + key.removeprefix("lm_head.")] = value
    for key, value in ac.items():
        if key.startswith("acoustic.encoder.") or key.startswith("acoustic.embeddings.LayerNorm") \
                or key.startswith("acoustic.embeddings.position_embeddings"):
            expected["audio." + key.removeprefix("acoustic.")] = value
        elif key.startswith("am_head.") and key.split(".")[1] in ("dense", "layer_norm", "decoder") \
                and key != "am_head.decoder.bias":
            expected["acoustic_head." + key.removeprefix("am_head.")] = value
    # the token-type row every frame adds, folded into the projection bias
    expected["audio.embeddings.projection.bias"] = (ac["acoustic.embeddings.dense.bias"]
                                                    + ac["acoustic.embeddings.token_type_embeddings.weight"][0])
    assert sorted(expected) == sorted(ours)  # every parameter of ours has a release tensor
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    assert model.mlm_head.decoder.weight is model.text.embeddings.word_embeddings.weight


def test_the_converted_config_reproduces_the_release_encoders(converted):
    cfg = CTALForPretraining.from_pretrained(converted).config
    assert (cfg.audio_causal, cfg.layer_norm_eps, cfg.type_vocab_size, cfg.text_position_style,
            cfg.pad_token_id) == (True, 1e-12, 2, "roberta", 1)
    assert (cfg.hidden_size, cfg.num_text_layers, cfg.num_audio_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, cfg.max_audio_positions) == \
        (H, 1, 1, HEADS, FFN, TEXT_POSITIONS, AUDIO_POSITIONS)
    state = checkpoint.verify(converted)
    assert state["kind"] == "pretraining" and state["frontend"] == "release" and state["step"] == 1234
    assert checkpoint_data.trained_frontend(converted) == "release"
    card = (converted / "README.md").read_text()
    assert "features.frontend | release" in card and "CTAL-Tiny.ckpt" in card


def test_the_text_stream_and_mlm_logits_equal_transformers_roberta_and_the_model_runs(release, converted, bpe_dir):
    from transformers import RobertaConfig, RobertaForMaskedLM

    sem = release[0]["semantic_model"]
    hf = RobertaForMaskedLM(RobertaConfig(vocab_size=_vocab_size(bpe_dir), hidden_size=H, num_hidden_layers=1,
                                          num_attention_heads=HEADS, intermediate_size=FFN,
                                          max_position_embeddings=TEXT_POSITIONS, pad_token_id=1)).eval()
    missing, unexpected = hf.load_state_dict(sem, strict=False)
    assert not missing and set(unexpected) <= {"roberta.embeddings.position_ids"}
    model = CTALForPretraining.from_pretrained(converted).eval()
    ids = torch.tensor([[0, 40, 41, 42, 2, 1], [0, 50, 2, 1, 1, 1]])
    mask = (ids != 1).long()
    frames = torch.randn(2, 37, 160)
    frame_mask = torch.ones(2, 37, dtype=torch.bool)
    frame_mask[1, 30:] = False
    with torch.no_grad():
        out = model(ids, mask, frames, frame_mask)
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        text = model.encode_text(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(text[real], ref.hidden_states[-1][real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.mlm_logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert out.reconstructed_frames.shape == (2, 37, 160) and torch.isfinite(out.reconstructed_frames).all()
    # the audio embeddings the release computes: LayerNorm(dense(x) + token_type[0] + position)
    ac = release[0]["acoustic_model"]
    x = frames @ ac["acoustic.embeddings.dense.weight"].T + ac["acoustic.embeddings.dense.bias"] \
        + ac["acoustic.embeddings.token_type_embeddings.weight"][0] \
        + ac["acoustic.embeddings.position_embeddings.weight"][:37]
    expected = torch.nn.functional.layer_norm(x, (H,), ac["acoustic.embeddings.LayerNorm.weight"],
                                              ac["acoustic.embeddings.LayerNorm.bias"], eps=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model.audio.embeddings(frames), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, named", [
    ("extra", "semantic_model.roberta.pooler.dense.weight"),
    ("missing", "acoustic_head.dense.weight"),
    ("untied", "semantic_model.lm_head.decoder.weight"),
    ("shape", "acoustic_model.acoustic.embeddings.dense.weight"),
])
def test_a_planted_or_missing_key_is_refused_by_name_and_nothing_is_written(release, bpe_dir, tmp_path,
                                                                           change, named):
    ckpt = release_checkpoint(_vocab_size(bpe_dir))
    sem, ac = ckpt["semantic_model"], ckpt["acoustic_model"]
    if change == "extra":
        sem["roberta.pooler.dense.weight"] = torch.zeros(H, H)
    elif change == "missing":
        del ac["am_head.dense.weight"]
    elif change == "untied":
        sem["lm_head.decoder.weight"] = sem["lm_head.decoder.weight"] + 1
    else:
        ac["acoustic.embeddings.dense.weight"] = torch.zeros(H, 80)
    path = tmp_path / "release.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ReleaseFormatError, match=named.replace(".", r"\.")):
        convert_release(path, bpe_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.ckpt"]


def test_a_tokenizer_of_another_size_and_an_existing_output_are_refused(release, bpe_dir, converted, tmp_path):
    ckpt = release_checkpoint(_vocab_size(bpe_dir) + 3)
    with pytest.raises(ReleaseFormatError, match=rf"{_vocab_size(bpe_dir)} tokens.*{_vocab_size(bpe_dir) + 3}"):
        convert_release(ckpt, bpe_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_release(release[0], bpe_dir, converted)


def test_the_pipeline_converts_and_exits_2_on_a_bad_file(release, bpe_dir, tmp_path, capsys):
    from pipelines.convert_release import main

    assert main(["--checkpoint", str(release[1]), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "ok")]) == 0
    assert "features.frontend=release" in capsys.readouterr().out
    assert checkpoint.verify(tmp_path / "ok")["frontend"] == "release"
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "nothing.ckpt"), "--tokenizer", str(bpe_dir),
              "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()


# -- fine-tuning from it ---------------------------------------------------------------------------


def _task_data(out: Path, tokenizer_dir: Path, frontend: str) -> Path:
    """A tiny sentiment data set tokenized with ``tokenizer_dir`` (copied, so its hash is the same)."""
    from ctal.data import FBANK_DIM, write_dataset
    from ctal.tokenizer import load_tokenizer
    from tiny_data import WORDS

    out.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        text, t, split = " ".join(rng.choice(WORDS, size=5)), int(rng.integers(20, 60)), ("train", "dev", "test")[i % 3]
        records.append({"id": f"u{i}", "corpus": "tiny", "split": split, "speaker": f"{split}{i % 2}", "text": text,
                        "input_ids": np.asarray(tok(text)["input_ids"], np.int32), "n_frames": t,
                        "fbank": rng.normal(size=(t, FBANK_DIM)).astype(np.float32),
                        "label": float(rng.uniform(-3, 3)), "label_name": None, "duration_s": t / 100,
                        "sample_rate": 16000})
    write_dataset(out, records, tok, corpus="tiny", source="tests/test_release.py",
                  features=asdict(FeatureConfig(frontend=frontend)))
    return out


def test_finetune_takes_the_converted_checkpoint_and_refuses_kaldi_frames(converted, tmp_path):
    from ctal.finetune import finetune

    def cfg(data):
        return load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                           ["task=sentiment", f"data={data}", f"init={converted}", "epochs=1", "batch_size=4",
                            "max_frames=60", "model.fusion=ctal"])

    release_data = _task_data(tmp_path / "release", converted / "tokenizer", "release")
    result = finetune(cfg(release_data), out_dir=tmp_path / "ft", log=lambda _: None)
    assert len(result.history) == 1
    assert checkpoint.verify(tmp_path / "ft" / "last")["frontend"] == "release"
    kaldi_data = _task_data(tmp_path / "kaldi", converted / "tokenizer", "kaldi")
    with pytest.raises(ValueError, match=r"front end mismatch.*frontend=release.*frontend=kaldi.*"
                                         r"preprocess.*features\.frontend=release"):
        finetune(cfg(kaldi_data), log=lambda _: None)


# -- the release's front end -----------------------------------------------------------------------


def _slaney_mel(f):
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4))


def _slaney_hz(m):
    return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def reference_log_mel(x: np.ndarray, sr=16000, n_fft=400, hop=160, n_mels=80) -> np.ndarray:
    """librosa.feature.melspectrogram's definition (librosa 0.8 defaults) in numpy, then log(+1e-6)."""
    x = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")  # centred frames
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([x[i:i + n_fft] for i in range(0, len(x) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, 1 + n_fft/2)
    edges = _slaney_hz(np.linspace(_slaney_mel(0), _slaney_mel(sr / 2), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    fb *= 2 / (hi - lo)  # area normalization ("slaney")
    return np.log(power @ fb.T + 1e-6)


def reference_model_frames(logmel: np.ndarray) -> np.ndarray:
    """librosa.feature.delta (savgol, width 9, interp edges), then the release's CMVN."""
    feat = np.concatenate([logmel, savgol_filter(logmel, 9, 1, deriv=1, axis=0, mode="interp")], axis=1)
    return (feat - feat.mean(0)) / (feat.std(0) + 1e-16)


def _speechy(seconds=1.3, sr=16000, seed=0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(7 * t))
            + rng.normal(0, 0.02, t.shape)).astype(np.float32)


def test_release_log_mel_matches_the_definition_with_centred_frames():
    x = _speechy()
    ours = compute_fbank(x, 16000, frontend="release")
    assert ours.shape == (1 + len(x) // 160, 80) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_log_mel(x), rtol=1e-4, atol=2e-3)
    assert compute_fbank(x, 16000).shape == (1 + (len(x) - 400) // 160, 80)  # Kaldi's frames are not centred


def test_release_model_frames_take_delta_width_9_then_cmvn():
    logmel = compute_fbank(_speechy(seed=1), 16000, frontend="release")
    ours = model_frames(logmel, "release")
    assert ours.shape == (logmel.shape[0], 160)
    np.testing.assert_allclose(ours, reference_model_frames(logmel.astype(np.float64)), rtol=1e-4, atol=1e-4)
    # a torch tensor gives the same, and an utterance shorter than the delta window stays finite
    torch.testing.assert_close(model_frames(torch.from_numpy(logmel), "release"), torch.from_numpy(ours))
    slope = np.polyfit(np.arange(5), logmel[:5].astype(np.float64), 1)[0]  # one line over all 5 frames
    np.testing.assert_allclose(add_deltas(logmel[:5], 9, edges="interp")[:, 80:], np.broadcast_to(slope, (5, 80)),
                               rtol=1e-4, atol=1e-5)
    short = model_frames(logmel[:5], "release")
    assert np.isfinite(short).all() and np.all(short[:, 80:] == 0)  # a constant delta normalizes to 0


def test_collate_applies_the_data_sets_front_end():
    from ctal.batching import collate

    logmel = compute_fbank(_speechy(seed=2), 16000, frontend="release")
    rows = [{"input_ids": np.array([0, 5, 2], np.int32), "fbank": logmel}]
    release = collate(rows, max_frames=3000, pad_token_id=1, frontend="release")["frames"][0]
    kaldi = collate(rows, max_frames=3000, pad_token_id=1)["frames"][0]
    torch.testing.assert_close(release, torch.from_numpy(model_frames(logmel, "release")))
    assert not torch.allclose(release[:, 80:], kaldi[:, 80:], atol=1e-2)  # other delta rule


def test_the_release_front_end_is_a_checked_config_choice():
    assert FeatureConfig().frontend == "kaldi"
    with pytest.raises(ConfigError, match="dither"):
        FeatureConfig(frontend="release", dither=1.0)
    with pytest.raises(ConfigError, match="frontend"):
        load_config(FeatureConfig, [], ["frontend=librosa"])
    with pytest.raises(ValueError, match="frontend"):
        model_frames(np.zeros((10, 80), np.float32), "librosa")


def test_the_featurizer_writes_release_frames_when_asked(tmp_path):
    import soundfile as sf

    from ctal.config import DataConfig
    from ctal.featurize import featurize_row
    from ctal.tokenizer import train_bpe_tokenizer

    x = _speechy(seed=3)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    tok = train_bpe_tokenizer(["a cat sat"] * 4, 300, tmp_path / "tok")
    row = {"id": "a", "audio_path": str(tmp_path / "a.wav"), "text": "a cat sat"}
    record, problem = featurize_row(row, tok, DataConfig(features=FeatureConfig(frontend="release")))
    assert problem is None and record["n_frames"] == 1 + len(x) // 160
    np.testing.assert_array_equal(record["fbank"], compute_fbank(x, 16000, frontend="release"))


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(ReleaseFormatError, match="not a torch.save checkpoint"):
        load_release_checkpoint(tmp_path / "x.ckpt")
    torch.save({"model": torch.zeros(2)}, tmp_path / "y.ckpt")
    with pytest.raises(ReleaseFormatError, match="no semantic_model, acoustic_model, Settings"):
        load_release_checkpoint(tmp_path / "y.ckpt")
