"""Release checkpoints as the authors' training code writes them (issue 27), and bad ones (issue 30).

The release's ``Runner.save_model`` pickles ``optimizer.state_dict()``, whose param groups hold
objects of its own ``m2p_optimization`` module (BertAdam's and Lamb's schedule), or apex's loss
scaler under ``apex: True``. Here a stand-in of that module (and of apex's) is written to a
temporary folder, imported, used to train one step of a model built the way the release builds it
(transformers' RobertaForMaskedLM; a RobertaEncoder with causal self-attention and cross-attention
for the frames) and saved with ``torch.save`` in ``save_model``'s layout; then the stand-ins leave
``sys.modules`` and ``sys.path``, and the converted model is compared with the model that wrote
the file. Malicious files must be refused with their payload never run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ctal import checkpoint
from ctal.model import CTALForPretraining
from test_release import _vocab_size, release_checkpoint

H, HEADS, FFN, TEXT_POSITIONS, AUDIO_POSITIONS = 32, 4, 64, 130, 3000
STANDINS = ("m2p_optimization", "apex", "apex.fp16_utils", "apex.fp16_utils.loss_scaler")

# What the release's optimizers keep, not their maths: a schedule object in every param group, and
# per-parameter moments. Written here from the behaviour RELEASE.md describes.
M2P_OPTIMIZATION = '''
import torch


class _LRSchedule:
    def __init__(self, warmup=0.002, t_total=-1, **kw):
        self.warmup, self.t_total, self.warned_for_t_total_at_progress = warmup, t_total, -1


class WarmupLinearSchedule(_LRSchedule):
    pass


class WarmupCosineSchedule(_LRSchedule):
    pass


SCHEDULES = {"warmup_linear": WarmupLinearSchedule, "warmup_cosine": WarmupCosineSchedule}


class BertAdam(torch.optim.Optimizer):
    moments = ("next_m", "next_v")

    def __init__(self, params, lr, warmup=-1, t_total=-1, schedule="warmup_linear", **kw):
        schedule = SCHEDULES[schedule](warmup=warmup, t_total=t_total)  # the object, in every group
        super().__init__(params, dict(lr=lr, schedule=schedule, weight_decay=0.01, **kw))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update({"step": 0, **{m: torch.zeros_like(p) for m in self.moments}})
                state[self.moments[0]].add_(p.grad)
                state["step"] += 1
                p.add_(state[self.moments[0]], alpha=-group["lr"])


class Lamb(BertAdam):
    moments = ("exp_avg", "exp_avg_sq")
'''
LOSS_SCALER = '''
class DynamicLossScaler:
    def __init__(self, init_scale=2.0 ** 32, scale_factor=2.0, scale_window=1000):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window = scale_factor, scale_window
'''


@contextlib.contextmanager
def release_code(root: Path):
    """The stand-ins importable as the release's modules, and gone (sys.modules and sys.path) after."""
    (root / "apex" / "fp16_utils").mkdir(parents=True)
    (root / "m2p_optimization.py").write_text(M2P_OPTIMIZATION)
    (root / "apex" / "__init__.py").write_text("")
    (root / "apex" / "fp16_utils" / "__init__.py").write_text("")
    (root / "apex" / "fp16_utils" / "loss_scaler.py").write_text(LOSS_SCALER)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("m2p_optimization")
    finally:
        sys.path.remove(str(root))
        for name in STANDINS:
            sys.modules.pop(name, None)


# -- the model as the release builds it -------------------------------------------------------------


def roberta_config(vocab: int, positions: int, decoder: bool):
    from transformers import RobertaConfig

    cfg = RobertaConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=positions, pad_token_id=1,
                        is_decoder=decoder, add_cross_attention=decoder)
    cfg._attn_implementation = "eager"  # the masks below are additive, as the release's
    return cfg


class AcousticModel(nn.Module):
    """The release's masked acoustic model as its state dict names it: ``acoustic.embeddings`` (a frame
    projection, token types, positions, LayerNorm), ``acoustic.encoder`` (transformers' RobertaEncoder,
    causal self-attention and cross-attention to the text), ``am_head`` (its bias tied to the decoder's)."""

    def __init__(self):
        from transformers.models.roberta.modeling_roberta import RobertaEncoder

        super().__init__()
        self.acoustic = nn.Module()
        emb = self.acoustic.embeddings = nn.Module()
        emb.dense, emb.LayerNorm = nn.Linear(160, H), nn.LayerNorm(H, eps=1e-12)
        emb.token_type_embeddings, emb.position_embeddings = nn.Embedding(2, H), nn.Embedding(AUDIO_POSITIONS, H)
        emb.register_buffer("position_ids", torch.arange(AUDIO_POSITIONS)[None])
        self.acoustic.encoder = RobertaEncoder(roberta_config(3, AUDIO_POSITIONS, decoder=True))  # no words
        head = self.am_head = nn.Module()
        head.dense, head.layer_norm, head.decoder = nn.Linear(H, H), nn.LayerNorm(H, eps=1e-12), nn.Linear(H, 160)
        head.bias = head.decoder.bias

    def forward(self, frames, frame_mask, text, text_mask, causal: bool):
        emb = self.acoustic.embeddings
        t = frames.shape[1]
        x = emb.dense(frames) + emb.token_type_embeddings.weight[0] + emb.position_embeddings.weight[:t]
        allowed = frame_mask[:, None, None, :]
        if causal:  # the release's decoder mask: causal and padding
            allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
        neg = torch.finfo(x.dtype).min
        hidden = self.acoustic.encoder(emb.LayerNorm(x), attention_mask=(~allowed).float() * neg,
                                       encoder_hidden_states=text,
                                       encoder_attention_mask=(~text_mask.bool())[:, None, None, :].float() * neg)[0]
        head = self.am_head
        return head.decoder(head.layer_norm(nn.functional.gelu(head.dense(hidden))))


def release_model(vocab: int, seed: int = 0) -> nn.Module:
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    model = nn.Module()
    model.semantic_model = RobertaForMaskedLM(roberta_config(vocab, TEXT_POSITIONS, decoder=False))
    model.acoustic_model = AcousticModel()
    with torch.no_grad():  # away from the zero biases and unit norms of a fresh model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def release_outputs(model: nn.Module, causal: bool = True):
    """(MLM logits, reconstructed frames) of the release-built model on fixed tokens and frames."""
    ids, mask, frames, frame_mask = _inputs()
    with torch.no_grad():
        sem = model.semantic_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        frames_out = model.acoustic_model(frames, frame_mask, sem.hidden_states[-1], mask, causal)
    return sem.logits, frames_out


def converted_outputs(path: Path):
    ids, mask, frames, frame_mask = _inputs()
    with torch.no_grad():
        out = CTALForPretraining.from_pretrained(path).eval()(ids, mask, frames, frame_mask)
    return out.mlm_logits, out.reconstructed_frames


def _inputs():
    ids = torch.tensor([[0, 40, 41, 42, 43, 2, 1], [0, 50, 51, 2, 1, 1, 1]])
    frames = torch.randn(2, 45, 160, generator=torch.Generator().manual_seed(1))
    frame_mask = torch.ones(2, 45, dtype=torch.bool)
    frame_mask[1, 33:] = False
    return ids, (ids != 1).long(), frames, frame_mask


def release_settings(vocab: int, optimizer: str, apex: bool) -> dict:
    """``Settings`` as save_model stores it: the YAML (its sections) and the command line's Namespace."""
    stream = {"hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": HEADS, "intermediate_size": FFN,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              "initializer_range": 0.02}
    config = {"runner": {"apex": apex, "total_steps": 1000000, "save_step": 10000},
              "optimizer": {"type": optimizer, "learning_rate": "5e-5", "loss_scale": 0, "warmup_proportion": 0.07,
                            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0},
              "semantic": {**stream, "vocab_size": vocab, "max_position_embeddings": TEXT_POSITIONS},
              "acoustic": {**stream, "audio_size": 160, "max_position_embeddings": AUDIO_POSITIONS,
                           "downsample_rate": 1, "is_decoder": True, "add_cross_attention": True},
              "dataloader": {"batch_size": 6, "train_set": ["train-clean-100_alignment"]}}
    p = argparse.ArgumentParser()  # run_m2pretrain.py's kind of command line
    p.add_argument("--config")
    p.add_argument("--name")
    p.add_argument("--ckpdir")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--multi_gpu", action="store_true")
    paras = p.parse_args(["--config", "config/m2pretrain_tiny.yaml", "--name", "tiny", "--ckpdir", "result/"])
    return {"Config": config, "Paras": paras}


def write_release_training_checkpoint(path: Path, vocab: int, optimizer: str | None, root: Path) -> nn.Module:
    """One step of the stand-in optimizer ("adam": BertAdam, "lamb", "apex": half weights and
    FP16_Optimizer's state around a fused Adam, None: no Optimizer entry), then save_model's
    torch.save. Returns the model, its weights as saved."""
    model = release_model(vocab)
    with release_code(root) as m2p:
        groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n], "weight_decay": 0.01},
                  {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
        opt = {"adam": m2p.BertAdam, "lamb": m2p.Lamb, "apex": torch.optim.Adam, None: None}[optimizer]
        if opt is not None:
            opt = opt(groups, lr=1e-4) if optimizer == "apex" else opt(groups, lr=1e-4, warmup=0.07, t_total=100)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 0.01
            opt.step()
        if optimizer == "apex":  # FP16 training: half weights, fp32 masters in apex's FP16_Optimizer state
            from apex.fp16_utils.loss_scaler import DynamicLossScaler

            masters = [[p.detach().clone() for p in g["params"]] for g in groups]
            model.half()
        states = {"semantic_model": model.semantic_model.state_dict(),
                  "acoustic_model": model.acoustic_model.state_dict()}
        if optimizer == "apex":
            states["Optimizer"] = {"loss_scaler": DynamicLossScaler(), "dynamic_loss_scale": True, "overflow": False,
                                   "first_closure_call_this_step": True, "optimizer_state_dict": opt.state_dict(),
                                   "fp32_from_fp16": masters}
            model.float()  # the reference computes in fp32 on the weights as saved (rounded to half)
        elif opt is not None:
            states["Optimizer"] = opt.state_dict()
        states["Global_step"] = 1
        states["Settings"] = release_settings(vocab, "adam" if optimizer in ("apex", None) else optimizer,
                                              apex=optimizer == "apex")
        torch.save(states, path)
    return model


def convert(*argv) -> tuple[int, str, str]:
    """pipelines/convert_release.py's main in process → (exit code, stdout, stderr)."""
    from pipelines.convert_release import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


# -- what the release's training code writes ---------------------------------------------------------


@pytest.mark.parametrize("optimizer, records", [
    ("adam", "m2p_optimization.WarmupLinearSchedule ×2"),
    ("lamb", "m2p_optimization.WarmupLinearSchedule ×2"),
    ("apex", "apex.fp16_utils.loss_scaler.DynamicLossScaler ×1"),
    (None, None),
], ids=["adam", "lamb", "apex", "no-optimizer"])
def test_a_checkpoint_the_release_trained_converts_to_the_same_outputs(bpe_dir, tmp_path, optimizer, records):
    ckpt = tmp_path / "states-1.ckpt"
    model = write_release_training_checkpoint(ckpt, _vocab_size(bpe_dir), optimizer, tmp_path / "code")
    assert not set(STANDINS) & set(sys.modules) and str(tmp_path / "code") not in sys.path
    with pytest.raises(ModuleNotFoundError):  # so nothing below can import the release's code
        importlib.import_module("m2p_optimization")
    code, out, err = convert("--checkpoint", ckpt, "--tokenizer", bpe_dir, "--out", tmp_path / "ctal")
    assert code == 0, err
    assert not set(STANDINS) & set(sys.modules)  # reading the file imported none of them
    if records:  # what was dropped is said, and recorded
        assert f"dropped Optimizer (held, as inert records: {records})" in out
    else:
        assert "dropped" not in out
    state = checkpoint.verify(tmp_path / "ctal")
    assert state["release"]["dropped"] == ([f"Optimizer (held, as inert records: {records})"] if records else [])
    assert state["step"] == 1 and "audio self-attention: causal (model.audio_causal=true, the file's is_decoder)" in out
    mask = _inputs()[1].bool()
    logits, frames = release_outputs(model)
    ours_logits, ours_frames = converted_outputs(tmp_path / "ctal")
    torch.testing.assert_close(ours_logits[mask], logits[mask], rtol=0, atol=1e-4)
    real = _inputs()[3]
    torch.testing.assert_close(ours_frames[real], frames[real], rtol=0, atol=1e-4)


def test_audio_causal_comes_from_the_file_unless_given_and_the_card_says_which(bpe_dir, tmp_path):
    ckpt = tmp_path / "states-1.ckpt"
    model = write_release_training_checkpoint(ckpt, _vocab_size(bpe_dir), "adam", tmp_path / "code")
    code, out, err = convert("--checkpoint", ckpt, "--tokenizer", bpe_dir, "--out", tmp_path / "bi", "--audio-causal", "false")
    assert code == 0, err
    assert "audio self-attention: bidirectional (model.audio_causal=false, given (--audio-causal))" in out
    assert CTALForPretraining.from_pretrained(tmp_path / "bi").config.audio_causal is False
    card = (tmp_path / "bi" / "README.md").read_text()
    assert "| model.audio_causal | False |" in card and "| audio_causal_from | given (--audio-causal) |" in card
    real = _inputs()[3]
    frames = release_outputs(model, causal=False)[1]  # the *_correct kind: bidirectional frames
    torch.testing.assert_close(converted_outputs(tmp_path / "bi")[1][real], frames[real], rtol=0, atol=1e-4)
    assert not torch.allclose(release_outputs(model, causal=True)[1][real], frames[real], atol=1e-3)
    code, out, err = convert("--checkpoint", ckpt, "--tokenizer", bpe_dir, "--out", tmp_path / "file")
    card = (tmp_path / "file" / "README.md").read_text()
    assert code == 0 and "| model.audio_causal | True |" in card and "| audio_causal_from | the file's is_decoder |" in card
    code, _, err = convert("--checkpoint", ckpt, "--tokenizer", bpe_dir, "--out", tmp_path / "x", "--audio-causal", "yes")
    assert code == 2 and "--audio-causal" in err and not (tmp_path / "x").exists()


# -- malicious files: refused, the payload never runs --------------------------------------------------


class Payload:
    """Unpickling this runs ``call(*args)``: what a planted checkpoint would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _planted(marker: Path) -> dict:
    return {"exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
            "os.system": Payload(os.system, f"touch {marker}"),
            "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
            "legacy os.system": Payload(os.system, f"touch {marker}")}


@pytest.mark.parametrize("kind, named", [("exec", "builtins.exec"), ("os.system", "posix.system"),
                                         ("subprocess.Popen", "Popen"),  # protocol 2 spells it commands.Popen
                                         ("legacy os.system", "posix.system")])
def test_a_planted_global_is_refused_by_name_and_never_runs(bpe_dir, tmp_path, kind, named):
    """The payload sits where the release keeps its schedule (an Optimizer param group, the entry that
    is dropped): it is refused all the same, before anything is unpickled."""
    marker = tmp_path / "marker"
    ckpt = release_checkpoint(_vocab_size(bpe_dir))
    ckpt["Optimizer"]["param_groups"][0]["schedule"] = _planted(marker)[kind]
    path = tmp_path / "states-1.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not kind.startswith("legacy"))
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", tmp_path / "out")
    assert code == 2 and f"{named} to load" in err and "refusing" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_planted_payload_is_real(tmp_path):
    """The control: an ordinary unpickle of the same kind of file does create the marker."""
    marker = tmp_path / "marker"
    torch.save({"Optimizer": _planted(marker)["exec"]}, tmp_path / "x.ckpt")
    torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert marker.exists()


def test_a_release_class_name_is_only_a_record_whatever_the_pickle_asks_of_it(bpe_dir, tmp_path):
    """A file that calls the allowed name with arguments (REDUCE) or gives it state gets an inert
    record holding them: the stand-in runs no code of the release and nothing else."""
    marker = tmp_path / "marker"
    with release_code(tmp_path / "code") as m2p:
        schedule = m2p.WarmupLinearSchedule(warmup=0.07, t_total=100)
        schedule.__dict__["__class__"] = "an attempt"  # state that would replace the class if set as attributes
        ckpt = release_checkpoint(_vocab_size(bpe_dir))
        ckpt["Optimizer"]["param_groups"][0]["schedule"] = schedule
        ckpt["Optimizer"]["param_groups"][0]["called"] = Payload(m2p.WarmupLinearSchedule, f"touch {marker}")
        torch.save(ckpt, tmp_path / "states-1.ckpt")
    from ctal.release import ReleaseRecord, load_release_checkpoint

    group = load_release_checkpoint(tmp_path / "states-1.ckpt")["Optimizer"]["param_groups"][0]
    assert type(group["schedule"]).__mro__[1] is ReleaseRecord
    assert group["schedule"].state["t_total"] == 100 and group["schedule"].release_class.endswith("WarmupLinearSchedule")
    assert group["called"].args == (f"touch {marker}",) and not marker.exists()
    assert "m2p_optimization" not in sys.modules


def test_a_module_of_the_release_outside_the_known_classes_is_refused(bpe_dir, tmp_path):
    """Only the optimizer classes are records: another module of the release (its runner) is refused."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "m2p_runner.py").write_text("class Runner:\n    pass\n")
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        ckpt = release_checkpoint(_vocab_size(bpe_dir))
        ckpt["Settings"]["Paras"] = importlib.import_module("m2p_runner").Runner()
        torch.save(ckpt, tmp_path / "states-1.ckpt")
    finally:
        sys.path.remove(str(tmp_path / "code"))
        sys.modules.pop("m2p_runner", None)
    code, _, err = convert("--checkpoint", tmp_path / "states-1.ckpt", "--tokenizer", bpe_dir, "--out", tmp_path / "out")
    assert code == 2 and "needs m2p_runner.Runner to load" in err and "m2p_runner" not in sys.modules


# -- bad input: one line, exit 2, nothing allocated, written or removed (issue 30) ----------------------


def _saved(tmp_path: Path, ckpt) -> Path:
    torch.save(ckpt, tmp_path / "release.ckpt")
    return tmp_path / "release.ckpt"


def _one_line_refusal(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and "error: " in err and "Traceback" not in err


def test_overwrite_replaces_only_an_earlier_conversion(bpe_dir, tmp_path):
    path = _saved(tmp_path, release_checkpoint(_vocab_size(bpe_dir)))
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", foreign, "--overwrite")
    assert _one_line_refusal(code, err) and f"refusing to write {str(foreign)!r}" in err
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"] and (foreign / "thesis.tex").read_text() == "years of work"
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", foreign)  # said so without it too
    assert _one_line_refusal(code, err) and "not a checkpoint converted from a release" in err
    # another ctal checkpoint (a fine-tuning one) is not a conversion either
    (foreign / "checkpoint.json").write_text(json.dumps({"kind": "finetuning"}))
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", foreign, "--overwrite")
    assert code == 2 and (foreign / "thesis.tex").exists()
    # a file: refused, untouched, and no hidden .old-* copy left beside it
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", plain, "--overwrite")
    assert _one_line_refusal(code, err) and str(plain) in err and plain.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an earlier conversion is replaced
    assert convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", tmp_path / "ctal")[0] == 0
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", tmp_path / "ctal", "--overwrite")
    assert code == 0, err
    assert checkpoint.verify(tmp_path / "ctal")["frontend"] == "release"


def test_a_config_that_does_not_fit_the_tensors_is_refused_before_allocating(bpe_dir, tmp_path):
    """vocab_size 200 000 000 at hidden 32 would be a 25.6 GB embedding (and its MLM bias)."""
    for section, key, value, named in (("semantic", "vocab_size", 200_000_000, "200000000"),
                                       ("acoustic", "num_hidden_layers", 1_000_000, "1000000")):
        ckpt = release_checkpoint(_vocab_size(bpe_dir))
        ckpt["Settings"]["Config"][section][key] = value
        path = _saved(tmp_path, ckpt)
        peak, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", tmp_path / "out")
        assert _one_line_refusal(code, err) and named in err, err
        assert time.perf_counter() - t0 < 10 and not (tmp_path / "out").exists()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20  # KiB: under 1 GiB more


@pytest.mark.parametrize("bad", ["empty", "text", "truncated", "a list", "settings a string", "config strings",
                                 "dropout a string", "a weight a string", "a state dict a list", "int keys"])
def test_a_text_empty_or_ill_typed_file_is_one_line_and_exit_2(bpe_dir, tmp_path, bad):
    path = tmp_path / "release.ckpt"
    ckpt = release_checkpoint(_vocab_size(bpe_dir))
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "text":
        path.write_text("semantic_model: not a checkpoint\n")
    elif bad == "truncated":
        torch.save(ckpt, path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        if bad == "a list":
            ckpt = [ckpt]
        elif bad == "settings a string":
            ckpt["Settings"] = "m2pretrain_tiny.yaml"
        elif bad == "config strings":
            for section in ("semantic", "acoustic"):
                ckpt["Settings"]["Config"][section]["hidden_size"] = "32"
        elif bad == "dropout a string":
            ckpt["Settings"]["Config"]["acoustic"]["hidden_dropout_prob"] = "0.1"
        elif bad == "a weight a string":
            ckpt["acoustic_model"]["am_head.dense.weight"] = "weights"
        elif bad == "a state dict a list":
            ckpt["semantic_model"] = list(ckpt["semantic_model"].values())
        else:  # no release checkpoint, keys that do not sort together
            ckpt = {1: torch.zeros(1), "semantic_model": {}}
        torch.save(ckpt, path)
    code, _, err = convert("--checkpoint", path, "--tokenizer", bpe_dir, "--out", tmp_path / "out")
    assert _one_line_refusal(code, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(bpe_dir, tmp_path, value):
    ckpt = release_checkpoint(_vocab_size(bpe_dir))
    ckpt["acoustic_model"]["acoustic.encoder.layer.0.crossattention.self.key.weight"][3, 5] = value
    code, _, err = convert("--checkpoint", _saved(tmp_path, ckpt), "--tokenizer", bpe_dir, "--out", tmp_path / "out")
    assert _one_line_refusal(code, err) and "acoustic_model.acoustic.encoder.layer.0.crossattention.self.key.weight" in err
    assert "NaN or infinite" in err and not (tmp_path / "out").exists()


# -- the journey after conversion ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_task_data(bpe_dir, tmp_path_factory, synthetic_corpus, ray_local) -> tuple[Path, Path]:
    """(a checkpoint the release trained, converted; the synthetic MOSEI corpus preprocessed for it
    with features.frontend=release and its tokenizer), before any test of this module blocks Ray."""
    from ctal.config import DataConfig, FeatureConfig
    from ctal.distributed.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("journey")
    write_release_training_checkpoint(root / "states-1.ckpt", _vocab_size(bpe_dir), "adam", root / "code")
    converted = root / "ctal-release"
    assert convert("--checkpoint", root / "states-1.ckpt", "--tokenizer", bpe_dir, "--out", converted)[0] == 0
    data = root / "mosei-release"
    run_preprocess("mosei", synthetic_corpus("mosei"), data,
                   DataConfig(tokenizer=str(converted), features=FeatureConfig(frontend="release")), verbose=False)
    return converted, data


@pytest.mark.slow  # ~30 s alone (Ray, a synthetic corpus, preprocessing); the default tier fine-tunes in test_release
def test_the_journey_from_a_release_checkpoint(release_task_data, synthetic_corpus, tmp_path, run_recipe):
    """Converted → task data preprocessed with features.frontend=release and its tokenizer →
    fine-tuned → evaluated → embedded, the embedder applying the release front end; data made with
    another front end or tokenizer refused before Ray with the fix."""
    import pyarrow.parquet as pq

    from ctal.batching import collate
    from ctal.config import FinetuneConfig, load_config
    from ctal.corpora import read_corpus
    from ctal.data import open_dataset
    from ctal.embed import load_for_embedding
    from ctal.finetune import finetune
    from ctal.tokenizer import train_bpe_tokenizer
    from test_release import REPO, _task_data

    converted, data = release_task_data
    corpus = synthetic_corpus("mosei")
    assert open_dataset(data).frontend == "release"

    overrides = ["task=sentiment", f"data={data}", f"init={converted}", "epochs=1", "batch_size=4", "max_frames=400"]
    cfg = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"], overrides)
    finetune(cfg, out_dir=tmp_path / "ft", log=lambda _: None)
    tuned = tmp_path / "ft" / "last"
    assert checkpoint.verify(tuned)["frontend"] == "release"

    code, err = run_recipe("evaluate", "--task", "sentiment", "--checkpoint", tuned, "--out", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert {"mae", "corr", "acc2", "f1", "acc7"} <= set(metrics)

    rows = read_corpus("mosei", corpus)[:3]
    (tmp_path / "m.csv").write_text("id,audio_path,text\n" + "".join(f"{r['id']},{r['audio_path']},{r['text']}\n" for r in rows))
    code, err = run_recipe("embed", "--checkpoint", tuned, "--manifest", tmp_path / "m.csv", "--out", tmp_path / "e.parquet")
    assert code == 0, err
    embedded = pq.read_table(tmp_path / "e.parquet").to_pandas().set_index("id")
    # the same utterance from the task data (release frames, preprocessed) through the fine-tuned model
    model, _, data_cfg = load_for_embedding(tuned)
    assert data_cfg.features.frontend == "release"
    table = pq.read_table(open_dataset(data).shards[0]).to_pylist()
    row = next(r for r in table if r["id"] in embedded.index)
    batch = collate([row], max_frames=3000, pad_token_id=1, frontend="release")
    with torch.no_grad():
        text, audio = model.eval().stream_states(batch["input_ids"], batch["attention_mask"], batch["frames"],
                                                 batch["frame_mask"])
        fused, _ = model.fusion(text, batch["attention_mask"], audio, batch["frame_mask"])
    torch.testing.assert_close(torch.as_tensor(embedded.loc[row["id"], "embedding"]), fused[0], rtol=0, atol=1e-4)

    # the refusals, each naming its fix, before Ray
    kaldi = _task_data(tmp_path / "kaldi", converted / "tokenizer", "kaldi")
    other = tmp_path / "other"
    train_bpe_tokenizer(["a cat sat on the mat"] * 5, 300, other / "tok")
    other_tok = _task_data(other / "data", other / "tok", "release")
    sweep = ["--task", "sentiment", "--init", converted, "--storage", tmp_path / "tune"]
    code, err = run_recipe("tune_finetune", "--data", kaldi, *sweep)
    assert code == 2 and "front end mismatch" in err and "features.frontend=release" in err, err
    code, err = run_recipe("tune_finetune", "--data", other_tok, *sweep)
    assert code == 2 and f"tokenizer={converted}" in err, err
    assert not (tmp_path / "tune").exists()
