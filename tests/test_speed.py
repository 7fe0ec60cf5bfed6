"""Issue 16 (throughput): the step's fast paths keep the release's function, on narrow models.

The reference is benchmarks/step_vs_reference.py's ReleaseReference (transformers' RoBERTa modules,
built as the release builds its model): checked here so the benchmark's equality check cannot rot.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ctal.config import PretrainConfig
from ctal.model import CTALConfig, CTALForPretraining
from ctal.optim import build_optimizer
from ctal.pretrain import pad_to_buckets, training_autocast

REPO = Path(__file__).resolve().parents[1]
NARROW = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=300, num_text_layers=2,
              num_audio_layers=2, max_position_embeddings=40, max_audio_positions=256)


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _benchmark("step_vs_reference")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- item 1: the step against the release's architecture -----------------------------------------------

@pytest.mark.parametrize("frames, tokens", [([120, 120], [20, 20]), ([120, 71], [20, 9])],
                         ids=["no-padding", "padded"])
def test_reference_from_hf_modules_and_ctal_agree_on_losses_and_gradients(bench, frames, tokens):
    cfg = CTALConfig(**NARROW, audio_causal=True)  # the release's causal frames
    ours, ref = bench.reference_pair(cfg)
    batch = bench.fixed_batch(cfg, frames, tokens)
    assert batch["acoustic_mask"].any() and (batch["mlm_labels"] != -100).any()
    ours_l, ref_l = bench.losses(ours, batch), bench.losses(ref, batch)
    assert max(abs(a - b) for a, b in zip(ours_l, ref_l)) <= 1e-5, (ours_l, ref_l)
    ours.eval(), ref.eval()
    ours(**batch).loss.backward()
    ref(**batch)[0].backward()
    pairs = {"text.encoder.layer.1.attention.self.query.weight": "text.roberta.encoder.layer.1.attention.self.query.weight",
             "text.embeddings.word_embeddings.weight": "text.roberta.embeddings.word_embeddings.weight",
             "audio.encoder.layer.0.crossattention.self.key.weight": "audio.encoder.layer.0.crossattention.self.key.weight",
             "audio.embeddings.projection.weight": "frame_projection.weight",
             "acoustic_head.decoder.bias": "acoustic_head.bias"}
    g_ours, g_ref = _grads(ours), _grads(ref)
    for a, b in pairs.items():
        torch.testing.assert_close(g_ours[a], g_ref[b], rtol=1e-4, atol=1e-6, msg=a)


def test_heads_only_where_the_loss_looks_give_the_all_positions_losses_and_gradients(bench):
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW)).eval()
    batch = bench.fixed_batch(model.config, [120, 64], [20, 11])
    results = []
    for full in (True, False):
        model.zero_grad()
        out = model(**batch, return_logits=full)
        out.loss.backward()
        results.append((out, _grads(model)))
    (full, g_full), (scored, g_scored) = results
    assert scored.mlm_logits is None and full.mlm_logits.shape[:2] == batch["input_ids"].shape
    for key in ("loss", "mlm_loss", "masked_acoustic_loss"):
        torch.testing.assert_close(scored[key], full[key], rtol=0, atol=1e-6)
    assert g_full.keys() == g_scored.keys()
    for name in g_full:
        torch.testing.assert_close(g_scored[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
    # nothing masked: zero losses that still reach both heads (DDP waits for every gradient)
    model.zero_grad()
    none = dict(batch, mlm_labels=torch.full_like(batch["mlm_labels"], -100),
                acoustic_mask=torch.zeros_like(batch["acoustic_mask"]))
    out = model(**none)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert model.mlm_head.dense.weight.grad is not None and model.acoustic_head.dense.weight.grad is not None


def test_fused_adamw_takes_the_steps_of_the_default_adamw():
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW))
    twin = CTALForPretraining(CTALConfig(**NARROW))
    twin.load_state_dict(model.state_dict())
    cfg = PretrainConfig(lr=1e-3)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"]
    plain = build_optimizer(twin, cfg)
    for group in plain.param_groups:
        group["fused"] = False
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            for p in m.parameters():
                p.grad = torch.sin(p.detach() * 7 + 1)  # the same gradients for both
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


# -- item 2: activation checkpointing ------------------------------------------------------------------

def test_gradient_checkpointing_keeps_losses_and_gradients_with_dropout_on(bench):
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    batch = bench.fixed_batch(model.config, [120, 80], [20, 12])
    runs = []
    for checkpointed in (False, True):
        if checkpointed:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks, drawn in the same order
        out = model(**batch)
        out.loss.backward()
        runs.append((out.loss.detach(), _grads(model)))
    assert model.text.gradient_checkpointing and model.audio.gradient_checkpointing
    (loss, grads), (loss_ckpt, grads_ckpt) = runs
    assert torch.equal(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-8, msg=name)


# -- compile: bucketed shapes keep the losses ------------------------------------------------------

def test_compiled_layers_on_bucketed_batches_keep_the_losses(bench):
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW, audio_causal=True)).eval()
    batch = bench.fixed_batch(model.config, [100, 57], [13, 9])
    with torch.no_grad():
        eager = model(**batch)
        padded = pad_to_buckets(batch, model.config)
        assert padded["frames"].shape[1] == 128 and padded["input_ids"].shape[1] == 16
        model.compile_layers(backend="eager")  # dynamo's graphs without inductor's minutes of C++
        compiled = model(**padded)
    for key in ("loss", "mlm_loss", "masked_acoustic_loss"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-6)
    assert list(model.state_dict()) == list(CTALForPretraining(model.config).state_dict())  # names unchanged


# -- item 5: bf16 autocast on the CPU, and the --gpu benchmark's code path -------------------------------

def test_bf16_autocast_step_runs_on_cpu_with_fp32_losses_near_fp32(bench):
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW)).eval()
    batch = bench.fixed_batch(model.config, [120, 90], [20, 14])
    with torch.no_grad():
        fp32 = model(**batch)
    with training_autocast(torch.device("cpu"), True):
        out = model(**batch)
        assert model.text.embeddings.word_embeddings(batch["input_ids"]).dtype == torch.float32
    assert out.loss.dtype == torch.float32 and out.mlm_loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, fp32.loss, rtol=2e-2, atol=0)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_train_throughput_gpu_mode_runs_on_cpu_and_refuses_without_cuda(capsys):
    tt = _benchmark("train_throughput")
    args = ["--gpu", "--device", "cpu", "--sizes", "narrow", "--batch-size", "2", "--frames", "96", "--tokens", "12",
            "--gpu-steps", "1", "--gpu-warmup", "1", "--compile", "off"]
    assert tt.main(args) == 0
    out = capsys.readouterr().out
    assert "narrow" in out and "samples/s" in out and "tokens+frames/s" in out
    assert "MFU n/a (no GPU: MFU is against a GPU's peak)" in out
    if not torch.cuda.is_available():
        assert tt.main(["--gpu"]) == 2
        assert "--gpu needs a CUDA device" in capsys.readouterr().err
    from ctal.flops import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA A10G") == 125e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None


def test_pretraining_flops_of_the_scored_step_match_torchs_flop_counter():
    # As tests/test_model.py's check, for the step with labels: heads and last audio layer on the
    # scored positions only (the same number per row, so no filler slot computes).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ctal.flops import pretraining_flops
    cfg = CTALConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_text_layers=2,
                     num_audio_layers=3, vocab_size=300)
    model = CTALForPretraining(cfg)
    B, L, T = 2, 11, 37
    ids, frames = torch.randint(5, 300, (B, L)), torch.randn(B, T, cfg.audio_dim)
    labels = torch.full((B, L), -100)
    labels[:, 2:5] = ids[:, 2:5]
    acoustic = torch.zeros(B, T, dtype=torch.bool)
    acoustic[0, 3:10], acoustic[1, 20:27] = True, True
    ones = lambda n: torch.ones(B, n, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, ones(L), frames, ones(T), mlm_labels=labels, acoustic_mask=acoustic,
              target_frames=frames).loss.backward()
    assert counter.get_total_flops() == B * pretraining_flops(cfg, L, T, mlm_tokens=3, acoustic_frames=7,
                                                              last_layer_frames=7)


def test_the_loop_with_gradient_checkpointing_logs_the_losses_of_the_plain_loop(tmp_path):
    # The loop's wiring of the option (no Ray): same seed, same batches, same dropout, same losses.
    from ctal.config import load_config
    from ctal.pretrain import pretrain_loop
    from ctal.runlog import read_metrics

    tt = _benchmark("train_throughput")
    data = tt.make_dataset(tmp_path / "data", 8)
    logged = {}
    for option in ("false", "true"):
        cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml", REPO / "configs/narrow.yaml"],
                          [f"data={data}", f"storage_path={tmp_path}", f"run_name=ckpt-{option}", "max_steps=2",
                           "log_every=1", "checkpoint_every=2", "batch_size=2", "num_workers=1", "max_frames=96",
                           f"gradient_checkpointing={option}"])
        pretrain_loop(cfg, run_dir=tmp_path / option, log=lambda _: None)
        logged[option] = {s: m["loss"] for s, m in read_metrics(tmp_path / option).items()}
    assert len(logged["false"]) == 2
    assert logged["true"] == pytest.approx(logged["false"], rel=1e-6)


def test_pretraining_logs_the_flops_it_ran_and_mfu_against_a_known_peak(tiny_data, tmp_path, monkeypatch):
    """Issue 26.2: the loop counts each batch's FLOPs (ctal.flops.batch_flops: the scored step's count,
    checked against torch's counter above) and logs MFU where the device's peak is known."""
    import json

    from ctal import pretrain
    from ctal.config import load_config

    monkeypatch.setattr(pretrain, "peak_flops", lambda name: 1e12 if name == "cpu" else None)
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [f"data={tiny_data}", "max_frames=100", "max_steps=2", "checkpoint_every=2", "log_every=1",
                       "batch_size=4", "bucket_pool_rows=16", "model.hidden_size=32", "model.num_attention_heads=4",
                       "model.intermediate_size=64", "model.num_text_layers=1", "model.num_audio_layers=1"])
    lines = []
    pretrain.pretrain_loop(cfg, run_dir=tmp_path / "run", log=lines.append)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert m["tflops_per_s"] > 0 and m["mfu"] == pytest.approx(m["tflops_per_s"])  # a 1 TFLOP/s "peak"
    assert any(x.startswith("step ") and " | MFU " in x for x in lines)


def test_batch_flops_count_each_sample_at_its_real_and_scored_positions():
    from ctal.flops import batch_flops, pretraining_flops

    cfg = CTALConfig(**NARROW)
    mask = lambda lengths, n: torch.tensor([[1] * k + [0] * (n - k) for k in lengths])
    batch = {"attention_mask": mask([5, 3], 6), "frame_mask": mask([40, 20], 50),
             "mlm_labels": torch.tensor([[-100, 7, -100, -100, 9, -100], [-100] * 6]),
             "acoustic_mask": mask([6, 2], 50)}
    assert batch_flops(cfg, batch) == (pretraining_flops(cfg, 5, 40, mlm_tokens=2, acoustic_frames=6, last_layer_frames=6)
                                       + pretraining_flops(cfg, 3, 20, mlm_tokens=0, acoustic_frames=2,
                                                           last_layer_frames=2))
