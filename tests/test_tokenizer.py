"""Text normalization before tokenizing (the authors' rule) and how it travels with a tokenizer."""
import pytest

from ctal.config import ConfigError, DataConfig, load_config
from ctal.tokenizer import (normalize_text, read_normalization, save_normalization, tokenizer_hash,
                            train_bpe_tokenizer)


@pytest.mark.parametrize("text, mode, expected", [
    # the release's fine-tuning rule: .,?! become spaces, runs of spaces one, then lower case
    ("The movie was GOOD.", "release", "the movie was good "),
    ("Well,  really?! Yes.", "release", "well really yes "),
    ("CAFÉ; it's  fine", "release", "café; it's fine"),  # only .,?! go; other punctuation stays
    ("HE SAID NOTHING", "release", "he said nothing"),  # LibriSpeech: lower case is all it does
    ("Mixed, Case.", "lower", "mixed, case."),
    ("Mixed, Case.", "none", "Mixed, Case."),
])
def test_normalize_text_follows_the_rule_of_each_mode(text, mode, expected):
    assert normalize_text(text, mode) == expected


def test_unknown_modes_are_refused_in_code_and_in_config():
    with pytest.raises(ValueError, match="text_normalization='upper'"):
        normalize_text("x", "upper")
    with pytest.raises(ConfigError, match="text_normalization"):
        load_config(DataConfig, [], ["text_normalization=upper"])
    assert DataConfig().text_normalization is None  # resolved at preprocessing: the tokenizer's, else "release"


def test_normalization_is_part_of_the_tokenizer_identity(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran"] * 5
    for name in ("a", "b"):
        train_bpe_tokenizer(texts, 300, tmp_path / name)
    assert read_normalization(tmp_path / "a") is None  # nothing recorded: e.g. a Hugging Face folder
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(tmp_path / "b")
    save_normalization(tmp_path / "a", "release")
    save_normalization(tmp_path / "b", "none")
    assert (read_normalization(tmp_path / "a"), read_normalization(tmp_path / "b")) == ("release", "none")
    assert tokenizer_hash(tmp_path / "a") != tokenizer_hash(tmp_path / "b")  # same vocabulary, other text
