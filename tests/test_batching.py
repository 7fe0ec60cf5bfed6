"""Length bucketing, collate and the per-worker Parquet feed (no Ray)."""
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctal.batching import PretrainBatches, bucket_batches, collate, derive_seed, padding_efficiency, split_matches
from ctal.config import MaskingConfig
from ctal.data import TOKENIZER_DIR, open_dataset
from ctal.data import write_dataset as write_contract_dataset
from ctal.features import add_deltas, normalize_utterance
from ctal.feed import FeedError, feed, prefetch
from ctal.masking import IGNORE_INDEX
from ctal.tokenizer import train_bpe_tokenizer

PAD, MASK, SPECIAL = 1, 4, [0, 1, 2, 3, 4]


def write_dataset(out: Path, n: int, *, rows_per_group: int, rows_per_shard: int, seed: int = 0,
                  frames=(20, 200), split_every: int = 0, noise: bool = True) -> Path:
    """Parquet shards of PARQUET_SCHEMA with random fbank (row i: id u{i}, text ids [0, 5+i%50.., 2])."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        T = int(rng.integers(*frames))
        recs.append({"id": f"u{i:05d}", "corpus": "fixture",
                     "split": "dev" if split_every and i % split_every == 0 else "train",
                     "speaker": f"s{i % 3}", "text": "x",
                     "input_ids": np.array([0, *(5 + (i + k) % 50 for k in range(i % 7 + 1)), 2], np.int32),
                     "n_frames": T, "label": None,
                     "fbank": (rng.normal(size=(T, 80)) if noise else np.zeros((T, 80))).astype(np.float32),
                     "label_name": None, "duration_s": T / 100, "sample_rate": 16000})
    tok = train_bpe_tokenizer(["x"], 300, out / TOKENIZER_DIR)  # the contract wants one; ids here are synthetic
    write_contract_dataset(out, recs, tok, corpus="fixture", source="tests/test_batching.py",
                           rows_per_shard=rows_per_shard, row_group_size=rows_per_group)
    return out


# --------------------------------------------------------------------------------------------------
# bucketing


def test_bucket_batches_cover_every_index_once_and_are_seeded_per_epoch():
    n = np.random.default_rng(0).integers(50, 3000, 501)
    a = bucket_batches(n, batch_size=8, seed=3, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(n)))
    assert all(len(b) == 8 for b in a[:-1] if len(b) != 501 % 8) and len(a) == -(-501 // 8)
    assert a == bucket_batches(n, batch_size=8, seed=3, epoch=0)
    other = bucket_batches(n, batch_size=8, seed=3, epoch=1)
    assert other != a and len(other) == len(a)
    assert bucket_batches(n, batch_size=8, seed=4, epoch=0) != a


def test_bucketing_keeps_padding_low_where_random_batches_do_not():
    n = np.random.default_rng(1).integers(100, 3500, 2000)  # LibriSpeech-like spread, 1-35 s
    bucketed = bucket_batches(n, batch_size=8, seed=0, epoch=0)
    perm = np.random.default_rng(0).permutation(len(n))
    random_batches = [perm[i:i + 8] for i in range(0, len(n), 8)]
    assert padding_efficiency(bucketed, n) >= 0.97
    assert padding_efficiency(random_batches, n) < 0.7


def test_frame_budget_batches_fit_the_budget_and_count_is_epoch_invariant():
    n = np.random.default_rng(2).integers(50, 1200, 700)
    n[5] = 5000  # longer than the budget: a batch of its own
    budget = 4000
    for epoch in range(3):
        batches = bucket_batches(n, max_frames_per_batch=budget, seed=0, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(n)))
        for b in batches:
            assert len(b) * max(n[b]) <= budget or len(b) == 1
        assert [5] in batches
        if epoch == 0:
            count = len(batches)
        assert len(batches) == count


def test_padding_efficiency_by_hand():
    assert padding_efficiency([[0, 1], [2]], [10, 5, 7]) == pytest.approx((10 + 5 + 7) / (20 + 7))
    assert padding_efficiency([], []) == 1.0


def test_unshuffled_batches_are_sorted_by_length():
    n = [5, 3, 9, 1, 7]
    assert bucket_batches(n, batch_size=2, seed=0, epoch=0, shuffle=False) == [[3, 1], [0, 4], [2]]


# --------------------------------------------------------------------------------------------------
# collate


def _rows(seed=0, lengths=(30, 55, 12)):
    rng = np.random.default_rng(seed)
    return [{"input_ids": [0] + list(rng.integers(5, 90, k)) + [2], "label": float(k % 3),
             "fbank": rng.normal(size=(T, 80)).astype(np.float32)} for k, T in zip((3, 9, 5), lengths)]


def test_collate_pads_and_featurizes_each_utterance_alone():
    rows = _rows()
    b = collate(rows, max_frames=40, pad_token_id=PAD)
    assert b["input_ids"].shape == (3, 11) and b["input_ids"].dtype == torch.long
    assert b["frames"].shape == (3, 40, 160) and b["frames"].dtype == torch.float32
    assert b["frame_mask"].dtype == torch.bool and b["frame_mask"].sum(1).tolist() == [30, 40, 12]
    assert b["attention_mask"].sum(1).tolist() == [5, 11, 7]
    assert (b["input_ids"][b["attention_mask"] == 0] == PAD).all()
    assert (b["frames"][~b["frame_mask"]] == 0).all()
    assert b["labels"].tolist() == [0.0, 0.0, 2.0]
    for i, r in enumerate(rows):  # reference: delta + normalization of the *cropped* utterance
        ref = normalize_utterance(add_deltas(torch.from_numpy(r["fbank"][:40])))
        T = len(ref)
        torch.testing.assert_close(b["frames"][i, :T], ref)
    # Parquet hands fbank over as a list of 80-lists: same batch
    as_lists = [{**r, "fbank": r["fbank"].tolist()} for r in rows]
    torch.testing.assert_close(collate(as_lists, max_frames=40, pad_token_id=PAD)["frames"], b["frames"])


def test_collate_truncates_text_keeping_the_closing_token():
    rows = _rows()
    b = collate(rows, max_frames=100, pad_token_id=PAD, max_tokens=6)
    assert b["input_ids"].shape[1] == 6
    assert b["input_ids"][1].tolist() == [int(x) for x in rows[1]["input_ids"][:5]] + [2]


def test_collate_masking_never_touches_padding_and_is_seeded():
    rows = _rows(1, lengths=(120, 300, 60))
    kw = dict(max_frames=400, pad_token_id=PAD, masking=MaskingConfig(token_mask_prob=0.5),
              mask_token_id=MASK, vocab_size=100, special_token_ids=SPECIAL)
    b = collate(rows, generator=torch.Generator().manual_seed(7), **kw)
    plain = collate(rows, max_frames=400, pad_token_id=PAD)
    chosen = b["mlm_labels"] != IGNORE_INDEX
    assert chosen.any() and not (chosen & (plain["attention_mask"] == 0)).any()
    assert not chosen[:, 0].any()  # <s> is special
    assert torch.equal(b["mlm_labels"][chosen], plain["input_ids"][chosen])
    assert b["acoustic_mask"].any() and not (b["acoustic_mask"] & ~b["frame_mask"]).any()
    torch.testing.assert_close(b["target_frames"], plain["frames"])
    assert not torch.equal(b["frames"], plain["frames"])
    again = collate(rows, generator=torch.Generator().manual_seed(7), **kw)
    assert all(torch.equal(b[k], again[k]) for k in b)
    with pytest.raises(ValueError, match="generator"):
        collate(rows, **kw)


# --------------------------------------------------------------------------------------------------
# the per-worker feed


@pytest.fixture(scope="module")
def many_groups(tmp_path_factory):
    # 40 row groups of 10 rows in 4 shards: row-group striding for 2 workers (>= 8 groups each)
    return write_dataset(tmp_path_factory.mktemp("feed") / "data", 400, rows_per_group=10, rows_per_shard=100,
                         split_every=10)


@pytest.fixture(scope="module")
def few_groups(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("feed") / "small", 45, rows_per_group=16, rows_per_shard=30)


def _ids(batch):
    return [r["id"] for r in batch]


def _feed(path, rank, world, **kw):
    kw = {"seed": 0, "batch_size": 4, "pool_rows": 50, "columns": ("id", "input_ids", "fbank"), **kw}
    return PretrainBatches(path, rank=rank, world_size=world, **kw)


@pytest.mark.parametrize("data", ["many_groups", "few_groups"])
def test_ranks_read_disjoint_rows_in_equal_numbers_of_batches(data, request):
    path = request.getfixturevalue(data)
    feeds = [_feed(path, r, 2) for r in range(2)]
    assert feeds[0].batches_per_epoch == feeds[1].batches_per_epoch > 0
    seen = []
    for f in feeds:
        it = f.iter_from(0)
        ids = [i for _ in range(f.batches_per_epoch) for i in _ids(next(it))]
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    if data == "many_groups":  # every 10th row is dev
        assert all(int(i[1:]) % 10 for s in seen for i in s), "dev rows were read as train"


def test_rows_come_back_exactly_as_written(many_groups):
    f = _feed(many_groups, 0, 1, split="")
    table = pq.read_table(many_groups / "part-00001.parquet")
    want = {r["id"]: r for r in table.to_pylist()}
    for row in next(f.iter_from(0)) + next(f.iter_from(7)):
        if row["id"] in want:
            np.testing.assert_array_equal(row["fbank"], np.asarray(want[row["id"]]["fbank"], np.float32))
            assert row["input_ids"].tolist() == want[row["id"]]["input_ids"]


def test_resume_at_any_index_continues_the_same_stream_across_epochs(few_groups):
    f = _feed(few_groups, 1, 2)
    it = f.iter_from(0)
    stream = [_ids(next(it)) for _ in range(3 * f.batches_per_epoch)]
    assert stream[:f.batches_per_epoch] != stream[f.batches_per_epoch:2 * f.batches_per_epoch]  # reshuffled
    for start in (1, f.batches_per_epoch - 1, f.batches_per_epoch + 2):
        resumed = f.iter_from(start)
        assert [_ids(next(resumed)) for _ in range(4)] == stream[start:start + 4]


def test_resuming_late_in_an_epoch_reads_only_the_pools_it_needs(many_groups, monkeypatch):
    reads = []
    orig = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **kw: reads.append(i) or orig(self, i, *a, **kw))
    f = _feed(many_groups, 0, 2)
    assert len(f.pools) >= 3
    next(f.iter_from(f.batches_per_epoch - 1))  # the last batch of epoch 0: one pool
    assert 0 < len(reads) <= max(len(np.unique(f.rg_of_row[p])) for p in f.pools)
    assert len(reads) < len(f.row_groups) // 2


def test_bucketed_feed_keeps_padding_low(tmp_path):
    path = write_dataset(tmp_path / "d", 240, rows_per_group=20, rows_per_shard=120, frames=(100, 3500),
                         noise=False)  # only n_frames matters here
    f = PretrainBatches(path, rank=0, world_size=2, seed=0, batch_size=8, pool_rows=120, max_frames=3000)
    assert f.padding_efficiency(0) >= 0.92


def test_a_split_with_no_rows_is_named(few_groups):
    with pytest.raises(ValueError, match="splits present: \\['train'\\]"):
        _feed(few_groups, 0, 1, split="test")


def test_split_names_select_librispeech_subsets():
    assert split_matches("train-clean-100", ["train"]) and split_matches("train", ["train"])
    assert not split_matches("training", ["train"]) and not split_matches("dev-clean", ["train"])
    assert split_matches("Session3", ["Session[1-4]"]) and not split_matches("Session5", ["Session[1-4]"])
    assert split_matches("anything", [])


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(50)))) == list(range(50))

    def boom():
        yield 1
        raise KeyError("bad row")
    it = prefetch(boom())
    assert next(it) == 1
    with pytest.raises(KeyError, match="bad row"):
        next(it)


def test_long_buckets_hold_half_the_utterances_as_the_release():
    n = np.array([100] * 8 + [2500] * 8)
    sizes = sorted((len(b), max(n[b])) for b in bucket_batches(n, batch_size=4, seed=0, epoch=0,
                                                                halve_above_frames=2000))
    assert sizes == [(2, 2500)] * 4 + [(4, 100)] * 2
    assert all(len(b) == 4 for b in bucket_batches(n, batch_size=4, seed=0, epoch=0))  # 0: never halved
    assert [len(b) for b in bucket_batches(np.array([3000]), batch_size=1, seed=0, epoch=0,
                                           halve_above_frames=2000)] == [1]  # never below one


def test_utterances_over_max_frames_are_cropped_or_dropped(tmp_path):
    path = write_dataset(tmp_path / "d", 40, rows_per_group=10, rows_per_shard=20, frames=(100, 400), noise=False)
    longer = int((open_dataset(path).read(columns=["n_frames"]).column("n_frames").to_numpy() > 250).sum())
    assert 0 < longer < 40
    cropped = PretrainBatches(path, rank=0, world_size=1, seed=0, batch_size=1, max_frames=250)
    dropped = PretrainBatches(path, rank=0, world_size=1, seed=0, batch_size=1, max_frames=250, drop_longer=True)
    assert cropped.n_rows == 40 and cropped.n_frames.max() == 250 and cropped.n_dropped == 0
    assert dropped.n_rows == 40 - longer and dropped.n_dropped == longer
    with pytest.raises(ValueError, match="40 dropped as longer than max_frames=50"):
        PretrainBatches(path, rank=0, world_size=1, seed=0, batch_size=1, max_frames=50, drop_longer=True)


# --------------------------------------------------------------------------------------------------
# the feed: a thread, or processes sharing the reading


def _make_batch(rows, index):
    g = torch.Generator().manual_seed(derive_seed(7, index))
    b = collate(rows, max_frames=150, pad_token_id=PAD, masking=MaskingConfig(), mask_token_id=MASK,
                vocab_size=300, special_token_ids=SPECIAL, generator=g)
    b["index"] = index
    return b


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize("data", ["many_groups", "few_groups"])
def test_feed_processes_build_bit_identical_batches_to_the_thread_in_order(data, request):
    f = _feed(request.getfixturevalue(data), 0, 1, columns=("input_ids", "fbank"))
    n = 2 * f.batches_per_epoch + 3  # across epochs
    for start in (0, f.batches_per_epoch - 2):  # a fresh run and a resume late in an epoch
        want = _take(feed(f, _make_batch, start), n)
        assert [b["index"] for b in want] == list(range(start, start + n))
        for workers in (1, 3):
            torch.manual_seed(0)
            rng = torch.get_rng_state()
            got = _take(feed(f, _make_batch, start, workers=workers), n)
            assert torch.equal(torch.get_rng_state(), rng), "the feed moved the trainer's RNG"
            assert [b["index"] for b in got] == [b["index"] for b in want], workers
            for a, b in zip(got, want):
                assert a.keys() == b.keys()
                for k in a:
                    assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (workers, k)
    assert not multiprocessing.active_children(), "closing the feed left processes behind"


def test_feed_processes_read_each_row_group_once_and_together_the_whole_pool(many_groups, monkeypatch):
    f = _feed(many_groups, 0, 1, pool_rows=120, columns=("input_ids", "fbank"))
    pool = 0
    whole = np.concatenate([np.asarray(r["fbank"]) for r in f._read_pool(pool)])
    reads = []
    orig = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **kw: reads.append(i) or orig(self, i, *a, **kw))
    out = np.full_like(whole, np.nan)
    for part in range(3):
        f.read_audio_part(pool, part, 3, out)
    np.testing.assert_array_equal(out, whole)
    assert len(reads) == len(np.unique(f.rg_of_row[f.pools[pool]]))  # all covered, so each once


def test_a_feed_process_that_fails_stops_the_feed_with_one_line_naming_the_row(tmp_path):
    path = write_dataset(tmp_path / "d", 60, rows_per_group=10, rows_per_shard=60)
    shard = path / "part-00000.parquet"
    table = pq.read_table(shard)
    n_frames = table.column("n_frames").to_numpy().copy()
    n_frames[13] += 1  # the index says one frame more than the row holds
    table = table.set_column(table.schema.get_field_index("n_frames"), "n_frames",
                             pa.array(n_frames, pa.int32()))
    pq.write_table(table, shard, row_group_size=10)
    f = _feed(path, 0, 1, columns=("input_ids", "fbank"))
    with pytest.raises(FeedError, match=r"part-00000.parquet: row 13 has \d+ frames but its n_frames"
                                        r" column says \d+$"):
        _take(feed(f, _make_batch, 0, workers=3), f.batches_per_epoch)
    assert not multiprocessing.active_children()


def test_a_too_small_dev_shm_is_named_with_the_fix_before_anything_is_shared(few_groups, monkeypatch):
    import collections
    import shutil

    from ctal import feed as feeding

    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(feeding.shutil, "disk_usage",
                        lambda p: usage(64 << 20, 63 << 20, 1 << 20) if p == "/dev/shm" else real(p))
    f = _feed(few_groups, 0, 1, columns=("input_ids", "fbank"))
    with pytest.raises(FeedError, match=r"needs \d+ MiB of shared memory and /dev/shm has 1 MiB free: give it "
                                        r"more \(docker run --shm-size=2g.*feed_workers=0$"):
        _take(feed(f, _make_batch, 0, workers=2), 1)
    assert not multiprocessing.active_children()


def test_a_killed_feed_process_stops_the_feed_naming_it(many_groups):
    import os
    import signal

    f = _feed(many_groups, 0, 1, columns=("input_ids", "fbank"))
    it = feed(f, _make_batch, 0, workers=2)
    next(it)
    victim = multiprocessing.active_children()[0]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises((FeedError, RuntimeError), match=f"pid.*{victim.pid}"):
        for _ in range(10 * f.batches_per_epoch):
            next(it)
    it.close()
    assert not multiprocessing.active_children()


def test_batches_too_large_for_the_ring_go_dataloaders_way_and_odd_ring_sizes_stay_aligned(few_groups, monkeypatch):
    from ctal import feed as feeding

    f = _feed(few_groups, 0, 1, columns=("input_ids", "fbank"))
    want = _take(feed(f, _make_batch, 0), f.batches_per_epoch)
    for size in (4095, 1_000_003):  # too small for any batch; an odd size (each buffer still aligned)
        monkeypatch.setattr(feeding._ProcessFeed, "buffer_bytes", staticmethod(lambda data: size))
        got = _take(feed(f, _make_batch, 0, workers=2), f.batches_per_epoch)
        for a, b in zip(got, want):
            assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in b) and a.keys() == b.keys()
