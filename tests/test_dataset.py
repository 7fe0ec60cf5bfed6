"""The data-set object every stage opens (ctal.data.open_dataset) and the one report writer."""
import json
import shutil

import pytest

from ctal.data import (PARQUET_SCHEMA, REPORT_FILE, TOKENIZER_DIR, open_dataset, tokenizer_entry,
                       write_report)
from ctal.data import TaskData
from ctal.tokenizer import load_tokenizer, tokenizer_hash, train_bpe_tokenizer
from tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "tiny", n=30, splits=("train", "dev", "test"),
                              rows_per_shard=12)


def test_open_dataset_reports_what_the_files_hold(tiny):
    ds = open_dataset(tiny)
    report = json.loads((tiny / REPORT_FILE).read_text())
    assert ds.path == str(tiny.resolve()) and ds.report == report
    assert [s.name for s in ds.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert ds.splits == {"dev": 10, "test": 10, "train": 10}
    assert ds.features is None  # random frames, never featurized: no settings are claimed
    tok = ds.tokenizer
    assert tok.hash == tokenizer_hash(tiny / TOKENIZER_DIR) == report["tokenizer"]["hash"]
    assert tok.dir == tiny / TOKENIZER_DIR and tok.vocab_size == report["tokenizer"]["vocab_size"]
    assert (tok.pad_token_id, tok.mask_token_id) == (1, 4) and 0 in tok.special_token_ids
    table = ds.read(split="dev")
    assert table.schema.equals(PARQUET_SCHEMA) and set(table["split"].to_pylist()) == {"dev"}
    assert ds.read().num_rows == sum(s["rows"] for s in report["shards"]) == 30


def test_a_uri_data_set_opens_to_the_same_contents(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CTAL_CACHE_DIR", str(tmp_path / "cache"))
    local, remote = open_dataset(tiny), open_dataset(f"file://{tiny}")
    assert remote.path == f"file://{tiny}" and all(isinstance(s, str) for s in remote.shards)
    assert remote.tokenizer.hash == local.tokenizer.hash
    assert remote.tokenizer.dir != local.tokenizer.dir and str(tmp_path / "cache") in str(remote.tokenizer.dir)
    assert remote.read().equals(local.read()) and remote.splits == local.splits


def test_a_swapped_tokenizer_is_refused_naming_both_hashes(tiny, tmp_path):
    bad = tmp_path / "swapped"
    shutil.copytree(tiny, bad)
    shutil.rmtree(bad / TOKENIZER_DIR)
    train_bpe_tokenizer(["other words entirely", "not the same"], 300, bad / TOKENIZER_DIR)
    recorded, actual = open_dataset(tiny).tokenizer.hash, tokenizer_hash(bad / TOKENIZER_DIR)
    with pytest.raises(ValueError, match=f"{actual[:12]}.*{recorded[:12]}"):
        open_dataset(bad)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        TaskData.load(bad)  # fine-tuning opens data sets the same way


def test_incomplete_or_tokenizerless_data_sets_are_refused(tiny, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny, partial)
    (partial / REPORT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no report.json"):
        open_dataset(partial)
    noinfo = tmp_path / "noinfo"
    shutil.copytree(tiny, noinfo)
    report = json.loads((noinfo / REPORT_FILE).read_text())
    del report["tokenizer"]["mask_token_id"]
    (noinfo / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(ValueError, match="records no tokenizer mask_token_id"):
        open_dataset(noinfo)


def test_write_report_refuses_counts_that_do_not_add_up(tiny, tmp_path):
    tok_dir = tiny / TOKENIZER_DIR
    entry = tokenizer_entry(load_tokenizer(tok_dir), tok_dir, "test")
    shards = [{"file": "part-00000.parquet", "rows": 3}]
    with pytest.raises(ValueError, match="counts do not add up"):
        write_report(tmp_path, corpus="x", counts={"in": 5, "written": 3, "quarantined": 1}, shards=shards,
                     tokenizer=entry)
    with pytest.raises(ValueError, match="shard row counts"):
        write_report(tmp_path, corpus="x", counts={"in": 4, "written": 4}, shards=shards, tokenizer=entry)
    assert not (tmp_path / REPORT_FILE).exists()
    report = write_report(tmp_path, corpus="x", counts={"in": 4, "written": 3, "quarantined": 1}, shards=shards,
                          tokenizer=entry, features={"sample_rate": 16000})
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == report
    assert report["tokenizer"]["hash"] == tokenizer_hash(tok_dir)


def test_featurizer_settings_come_back_typed(tiny, tmp_path):
    from ctal.config import FeatureConfig

    d = tmp_path / "featurized"
    shutil.copytree(tiny, d)
    report = json.loads((d / REPORT_FILE).read_text())
    report["features"] = {"sample_rate": 16000, "num_mel_bins": 80, "frame_length_ms": 25.0,
                          "frame_shift_ms": 40.0, "dither": 0.0}
    (d / REPORT_FILE).write_text(json.dumps(report))
    assert open_dataset(d).features == FeatureConfig(frame_shift_ms=40.0)
