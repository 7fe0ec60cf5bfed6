"""Typed configs: YAML + dotted overrides, and errors that name the key before any work starts."""
from pathlib import Path

import pytest

from ctal.config import (ConfigError, DataConfig, FinetuneConfig, PretrainConfig, SweepConfig, load_config,
                         parse_overrides)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_yaml_files_merge_in_order_and_overrides_apply():
    cfg = load_config(PretrainConfig, [CONFIGS / "pretrain.yaml", CONFIGS / "base.yaml"],
                      ["model.hidden_size=256", "lr=1e-4", "model.fusion=late_concat",
                       "masking.span_max=40", "use_gpu=false"])
    assert cfg.model.num_text_layers == 6 and cfg.model.num_audio_layers == 6
    assert cfg.model.hidden_size == 256 and cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.model.fusion == "late_concat" and cfg.masking.span_max == 40
    assert cfg.use_gpu == "false" and cfg.model.text_init is None
    assert cfg.warmup_ratio == 0.07  # from pretrain.yaml


@pytest.mark.parametrize("size,layers", [("tiny", 3), ("base", 6), ("large", 12)])
def test_model_sizes_are_configs(size, layers):
    cfg = load_config(FinetuneConfig, [CONFIGS / "finetune.yaml", CONFIGS / f"{size}.yaml"])
    assert cfg.model.num_text_layers == cfg.model.num_audio_layers == layers
    assert cfg.model.hidden_size == 768 and cfg.lr == 1e-5 and cfg.batch_size == 2


def test_preprocess_defaults_load():
    cfg = load_config(DataConfig, [CONFIGS / "preprocess.yaml"], ["features.num_mel_bins=80"])
    assert cfg.features.frame_shift_ms == 10.0 and cfg.vocab_size == 30000


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"'model\.hiden_size'.*hidden_size"):
        load_config(PretrainConfig, [], ["model.hiden_size=256"])
    with pytest.raises(ConfigError, match=r"'learning_rate'.*\blr\b"):
        load_config(PretrainConfig, [], ["learning_rate=1"])


def test_unknown_key_in_a_yaml_file_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(PretrainConfig, [bad])


@pytest.mark.parametrize("override,key", [
    ("model.hidden_size=big", "model.hidden_size"),
    ("model.hidden_size=2.5", "model.hidden_size"),
    ("lr=fast", "lr"),
    ("bf16=maybe", "bf16"),
    ("model.fusion=concat", "model.fusion"),
    ("model=3", "model"),
    ("seed=true", "seed"),
])
def test_wrong_types_fail_with_the_key_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PretrainConfig, [], [override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_sweep_settings_load_from_yaml_with_overrides(tmp_path):
    assert load_config(SweepConfig, [CONFIGS / "sweep.yaml"]) == SweepConfig()  # the file states the defaults
    mine = tmp_path / "gpu.yaml"
    mine.write_text("gpus_per_trial: 0.5\nscheduler: fifo\nmax_concurrent: 4\n")
    sweep = load_config(SweepConfig, [CONFIGS / "sweep.yaml", mine],
                        ["search=grid", "max_concurrent=2", "storage=s3://bucket/tune", "num_samples=3"])
    assert (sweep.search, sweep.scheduler, sweep.max_concurrent, sweep.num_samples) == ("grid", "fifo", 2, 3)
    assert sweep.gpus_per_trial == 0.5 and sweep.storage == "s3://bucket/tune" and sweep.name is None


@pytest.mark.parametrize("override,message", [
    ("search=bayes", r"search: 'bayes' is not one of \['optuna', 'random', 'grid'\]"),
    ("scheduler=hyperband", r"scheduler: 'hyperband' is not one of \['asha', 'fifo'\]"),
    ("num_samples=many", "num_samples: expected an integer"),
    ("cpus_per_trial=lots", "cpus_per_trial: expected a number"),
    ("grace_period=1.5", "grace_period: expected an integer"),
    ("num_sample=4", r"unknown config key 'num_sample'.*num_samples"),
])
def test_bad_sweep_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SweepConfig, [CONFIGS / "sweep.yaml"], [override])


def test_a_text_init_that_is_no_checkpoint_fails_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.text_init=.*nowhere/config\.json does not exist"):
        load_config(PretrainConfig, [], [f"model.text_init={tmp_path / 'nowhere'}"])
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64}')
    with pytest.raises(ConfigError, match=r"config\.json has model_type='gpt2'; text_init supports bert and roberta"):
        load_config(FinetuneConfig, [], [f"model.text_init={tmp_path}"])
