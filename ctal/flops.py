"""FLOPs of a pretraining step and model FLOPs utilization (MFU), as nanoGPT's ``estimate_mfu``:
the pretraining loop logs MFU beside samples/s on a GPU whose peak is known, and the benchmarks
(benchmarks/train_throughput.py) count the same FLOPs."""
from __future__ import annotations

from typing import Optional

# Dense bf16 peak (no sparsity) by device name, FLOP/s ("H100" means the SXM card; its PCIe one is slower).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 125e12}


def peak_flops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak in FLOP/s from its device name, None for a card not listed."""
    for key, value in PEAK_BF16_FLOPS.items():  # "H100 PCIe" is listed before "H100", "L40S" before "L4"
        if key in device_name:
            return value
    return None


def pretraining_flops(cfg, tokens: int, frames: int, mlm_tokens: Optional[int] = None,
                      acoustic_frames: Optional[int] = None, last_layer_frames: Optional[int] = None) -> float:
    """Matmul FLOPs of one pretraining sample's forward + backward (3 × forward, as for MFU).

    `tokens`/`frames` are the sample's real positions; the heads cost `mlm_tokens` / `acoustic_frames`
    positions (all positions by default, fewer when the heads run only where the loss looks), and the
    last audio layer computes outputs for `last_layer_frames` (default all; the scored frames when
    CTALForPretraining runs it only there: every frame stays a key and value).
    Counts every Linear and both attention matmuls (2 FLOPs per multiply-add); norms, activations,
    softmax and embedding lookups are left out, as in the usual MFU accounting. Checked against
    torch's FlopCounterMode in tests/test_model.py.
    """
    H, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.audio_dim
    mlm_tokens = tokens if mlm_tokens is None else mlm_tokens
    acoustic_frames = frames if acoustic_frames is None else acoustic_frames
    layer = lambda n: n * (4 * H * H + 2 * H * I)  # QKV + output projection + FFN, per position
    text = cfg.num_text_layers * (layer(tokens) + 2 * tokens * tokens * H)
    m = frames if last_layer_frames is None else last_layer_frames  # the last layer's queries

    def audio_layer(q):  # Q, O, FFN and cross-attention for q query frames; K, V of every frame
        return (q * (2 * H * H + 2 * H * I) + 2 * H * H * frames + 2 * q * frames * H
                + 2 * H * H * (q + tokens) + 2 * q * tokens * H)  # cross: Q,O on frames; K,V on tokens
    audio = (cfg.num_audio_layers - 1) * audio_layer(frames) + audio_layer(m)
    heads = mlm_tokens * (H * H + H * V) + acoustic_frames * (H * H + H * D)
    # the input projection has no gradient to pass back to the frames: forward + weight gradient only
    # (several SSL layers: the projection reads their weighted sum, one layer wide)
    return 3 * 2 * float(text + audio + heads) + 2 * 2 * float(D // cfg.audio_layers * H * frames)


def batch_flops(cfg, batch: dict) -> float:
    """``pretraining_flops`` of every sample of a masked pretraining batch (``ctal.batching.collate``):
    its real tokens and frames, the heads where the loss looks (the scored positions)."""
    tokens, frames = batch["attention_mask"].sum(1).tolist(), batch["frame_mask"].sum(1).tolist()
    mlm, scored = (batch["mlm_labels"] != -100).sum(1).tolist(), batch["acoustic_mask"].sum(1).tolist()
    return sum(pretraining_flops(cfg, t, f, mlm_tokens=m, acoustic_frames=a, last_layer_frames=a)
               for t, f, m, a in zip(tokens, frames, mlm, scored))
