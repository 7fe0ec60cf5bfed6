"""ctal.upstream: a local SSL encoder's hidden states as stored features, checked against the
encoder's own ``output_hidden_states`` on tiny random models (conftest ``ssl_models``)."""
import functools
import json
import shutil
import socket

import numpy as np
import pytest
import torch

from ctal.upstream import (SUPPORTED, Upstream, UpstreamError, UpstreamInfo, inspect_upstream,
                           save_random_upstream, upstream_hash)

ARCHS = sorted(SUPPORTED)
LENGTHS = (4000, 3210, 2000, 401, 400)  # different lengths, down to one frame (short: CPU time)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads competing with other processes
    (a loaded CI machine) made these tests 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the hub is offline and any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("ctal.upstream tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def group_wav2vec2(tmp_path_factory):
    """wav2vec2-base's layout: group-normed CNN, no attention mask."""
    return save_random_upstream(tmp_path_factory.mktemp("ssl-group") / "w2v", "wav2vec2", feat_extract_norm="group")


def waves(lengths=LENGTHS, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in lengths]


@functools.lru_cache(maxsize=None)
def encoder(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True).eval()


def reference(path, wave: np.ndarray, layers, normalize=True) -> np.ndarray:
    """transformers' model alone, unpadded, on the feature extractor's normalization."""
    model = encoder(path)
    x = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7) if normalize else wave
    with torch.no_grad():
        hidden = model(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states
    return torch.cat([hidden[k][0] for k in layers], dim=-1).numpy()


def assert_fp16_close(got: np.ndarray, want: np.ndarray):
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layers", [(2,), (1,), (0,), (2, 0, 1)])
@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_the_encoders_hidden_states(ssl_models, arch, layers):
    up = Upstream(ssl_models[arch], layers)
    (wave,) = waves((3210,))
    (got,) = up([wave])
    assert got.shape == (up.num_frames(len(wave)), len(layers) * 32) and up.info.dim == got.shape[1]
    assert_fp16_close(got, reference(ssl_models[arch], wave, layers))


def test_feature_extractors_normalization_is_followed(ssl_models, tmp_path):
    """do_normalize=false (as some checkpoints ship) feeds the samples as they are."""
    path = shutil.copytree(ssl_models["hubert"], tmp_path / "raw")
    prep = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**prep, "do_normalize": False}))
    (wave,) = waves((2000,))
    (got,) = Upstream(path, (2,))([wave])
    assert_fp16_close(got, reference(path, wave, (2,), normalize=False))
    assert not np.allclose(got, reference(path, wave, (2,)), atol=1e-2)


@pytest.mark.parametrize("case", ["wav2vec2-layer", "wav2vec2-group", "data2vec-audio"])
def test_padding_changes_no_utterance(ssl_models, group_wav2vec2, case):
    path = {"wav2vec2-layer": ssl_models["wav2vec2"], "wav2vec2-group": group_wav2vec2,
            "data2vec-audio": ssl_models["data2vec-audio"]}[case]
    layers = (0, 2)
    up = Upstream(path, layers)
    batch = waves(LENGTHS + (2000,))  # one repeated length: equal lengths may share a pass
    got = up(batch)
    for wave, feats in zip(batch, got):
        assert_fp16_close(feats, reference(path, wave, layers))
    # only the layer-normed CNN with one positional convolution pads (with its mask); the others run
    # in groups of equal length
    passes = up._batches([len(w) for w in batch])
    assert up.pad_safe == (case == "wav2vec2-layer")
    assert len(passes) == (1 if up.pad_safe else len(LENGTHS))
    if not up.pad_safe:  # and padding really would change them (why they are not padded)
        up.pad_safe = True
        padded = up(batch)
        assert not all(np.allclose(a, b, atol=1e-2) for a, b in zip(got, padded))


def test_batches_bounded_by_max_batch_samples(ssl_models):
    up = Upstream(ssl_models["wav2vec2"], max_batch_samples=20000)
    assert up._batches([8000, 4000, 9000, 3000]) == [[2, 0], [1, 3]]  # longest first, 2 x 9000 fit
    got = up(waves((8000, 4000, 9000, 3000)))
    assert [len(g) for g in got] == [up.num_frames(n) for n in (8000, 4000, 9000, 3000)]


def test_num_frames_and_min_samples(ssl_models, monkeypatch):
    path = ssl_models["hubert"]
    up = Upstream(path)
    info = up.info
    assert (info.min_samples, info.frame_shift_ms, info.sample_rate) == (400, 20.0, 16000)
    for n in (400, 719, 720, 3999, 4000, 4080):
        (wave,) = waves((n,))
        assert up.num_frames(n) == len(reference(path, wave, (1,))) == (n - 400) // 320 + 1
    assert up.num_frames(info.min_samples) == 1 and up.num_frames(info.min_samples - 1) == 0
    assert up(waves((info.min_samples,)))[0].shape == (1, info.dim)
    # a too-short waveform anywhere in the batch refuses the batch before anything runs
    monkeypatch.setattr(up, "_batches", lambda lengths: pytest.fail("ran before checking every waveform"))
    with pytest.raises(UpstreamError, match=r"waveform 1 has 399 samples, shorter than one frame"):
        up(waves((4000, info.min_samples - 1)))


def test_adapter_does_not_shorten_the_frames(ssl_models, tmp_path):
    """An adapter (wav2vec2's add_adapter) runs after the encoder's layers: their hidden states keep
    the CNN's frames, though the model's own length rule would count the adapter's."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    path = shutil.copytree(ssl_models["wav2vec2"], tmp_path / "adapter")
    config = Wav2Vec2Config.from_pretrained(path, add_adapter=True, output_hidden_size=32)
    Wav2Vec2Model(config).save_pretrained(path)
    up = Upstream(path, (0, 2))
    (wave,) = waves((4000,))
    assert up([wave])[0].shape == (12, 64) and up.num_frames(4000) == 12
    assert up.model._get_feat_extract_output_lengths(4000) < 12


def test_autocast_bf16(ssl_models):
    layers = (0, 2)
    up = Upstream(ssl_models["wavlm"], layers, autocast_dtype=torch.bfloat16)
    (wave,) = waves((4000,))
    (got,) = up([wave])
    assert got.dtype == np.float16
    want = reference(ssl_models["wavlm"], wave, layers)
    np.testing.assert_allclose(got.astype(np.float32), want, atol=0.1, rtol=0.05)  # bf16's 8 bits


def test_loads_local_files_only(ssl_models, monkeypatch):
    import transformers

    seen = []
    for name in ("AutoModel", "AutoFeatureExtractor"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("local_files_only")))
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    Upstream(ssl_models["wav2vec2"])
    assert sorted(seen) == [("AutoFeatureExtractor", True), ("AutoModel", True)]


def test_info(ssl_models):
    info = inspect_upstream(ssl_models["data2vec-audio"])
    assert info.architecture == "data2vec-audio" and info.layers == (2,) and info.dim == 32
    assert info.hash == upstream_hash(ssl_models["data2vec-audio"])
    again = UpstreamInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    assert inspect_upstream(ssl_models["wavlm"], [2, 0]).dim == 64


def test_hash_follows_weights_not_other_files(ssl_models, tmp_path):
    path = shutil.copytree(ssl_models["wav2vec2"], tmp_path / "copy")
    before = upstream_hash(path)
    (path / "README.md").write_text("a model card\n")
    assert upstream_hash(path) == before
    save_random_upstream(tmp_path / "other", "wav2vec2", seed=1)  # same config, other weights
    shutil.copy(tmp_path / "other" / "model.safetensors", path / "model.safetensors")
    assert upstream_hash(path) != before
    assert inspect_upstream(path).hash == upstream_hash(path)


def _break(path, how):
    if how == "no config":
        (path / "config.json").unlink()
    elif how == "bert":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif how == "no weights":
        (path / "model.safetensors").unlink()
    elif how == "bad index":
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text("[]")
    elif how == "no preprocessor":
        (path / "preprocessor_config.json").unlink()


@pytest.mark.parametrize("target, layers, message", [
    ("missing", None, r"features.ssl_model='.*nope' does not exist: it must be a local"),
    ("file", None, r"features.ssl_model=.* is not a directory"),
    ("hub id", None, r"ssl_model='facebook/wav2vec2-base' is not a local folder .*hub id.*nothing is downloaded"),
    ("no config", None, r"has no config.json"),
    ("bert", None, r"is a 'bert' model .*supported ones are \['data2vec-audio', 'hubert', 'wav2vec2', 'wavlm'\]"),
    ("no weights", None, r"has no weights: expected one of \['model.safetensors', 'pytorch_model.bin'"),
    ("no preprocessor", None, r"has no preprocessor_config.json"),
    ("bad index", None, r"model.safetensors.index.json is not a weight index"),
    ("ok", [3], r"features.ssl_layers=\[3\]: \[3\] out of range; this model has 2 layers, so 0..2"),
    ("ok", [0, -1], r"features.ssl_layers=\[0, -1\]: \[-1\] out of range"),
    ("ok", [1, 2, 1], r"features.ssl_layers=\[1, 2, 1\] names \[1\] more than once"),
    ("ok", [], r"features.ssl_layers is empty"),
    ("ok", [1.5], r"features.ssl_layers=\[1.5\] must be whole numbers"),
    ("ok", [True], r"must be whole numbers"),
    ("ok", "2", r"must be a list of layer numbers"),
])
def test_inspect_refuses(ssl_models, tmp_path, monkeypatch, target, layers, message):
    monkeypatch.chdir(tmp_path)  # the hub id is no folder here
    if target == "missing":
        path = tmp_path / "nope"
    elif target == "file":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"")
    elif target == "hub id":
        path = "facebook/wav2vec2-base"
    else:
        path = shutil.copytree(ssl_models["wav2vec2"], tmp_path / "model")
        _break(path, target)
    with pytest.raises(UpstreamError, match=message):
        inspect_upstream(path, layers)


def test_sharded_and_bin_weights_count(ssl_models, tmp_path):
    """Weights may be pytorch_model.bin or a sharded index: both are accepted and hashed."""
    path = shutil.copytree(ssl_models["hubert"], tmp_path / "bin")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with_bin = inspect_upstream(path).hash
    (path / "pytorch_model.bin").rename(path / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    sharded = inspect_upstream(path).hash
    with open(path / "pytorch_model-00001-of-00001.bin", "ab") as f:  # the shard's bytes count
        f.write(b"\0")
    assert len({with_bin, sharded, upstream_hash(path)}) == 3
