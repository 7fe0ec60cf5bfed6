"""Batches: length bucketing, collate (delta + normalization + the paper's two masks), and each
pretraining worker's batches from Parquet (``PretrainBatches``; ctal.feed builds them beside training).

The feed follows DESIGN.md ("Ray, what we learned"): each worker reads only its own row groups with
pyarrow, forms seeded length-bucketed batches, and derives its position from the global batch index
(``epoch, skip = divmod(index, batches_per_epoch)``), so a restart skips to where it was without
reading what it skips and without any saved RNG or iterator state.
"""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .data import FBANK_DIM, audio_column, audio_format, list_shards, read_report
from .features import model_frames
from .masking import mask_frames, mask_tokens


def derive_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from integers, e.g. (seed, rank, step): no RNG state to save."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
               .generate_state(1, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------
# length bucketing


def bucket_batches(n_frames: Sequence[int], *, batch_size: int = 8, max_frames_per_batch: int = 0,
                   seed: int, epoch: int, shuffle: bool = True, halve_above_frames: int = 0) -> list[list[int]]:
    """Length-bucketed batches of indices into ``n_frames``.

    Indices are sorted by length (ties in a seeded random order) and cut into batches of
    ``batch_size`` (half as many, at least 1, where the batch's longest utterance has more than
    ``halve_above_frames`` > 0 frames: the release's rule for long buckets), or, when
    ``max_frames_per_batch`` > 0, into the largest runs whose padded size (count x longest) fits the
    budget (``batch_size`` is then ignored; an utterance longer than the budget forms a batch of its
    own). With ``shuffle`` the batch order is permuted. Deterministic in (seed, epoch); the number of
    batches does not depend on them.
    """
    n = np.asarray(n_frames, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)])
    order = rng.permutation(len(n)) if shuffle else np.arange(len(n))
    order = order[np.argsort(n[order], kind="stable")]  # ascending: the last index is the longest
    if max_frames_per_batch > 0:
        batches, start = [], 0
        for end in range(1, len(order) + 1):
            # n[order[end-1]] is the longest of order[start:end]
            if end - start > 1 and (end - start) * n[order[end - 1]] > max_frames_per_batch:
                batches.append(order[start:end - 1])
                start = end - 1
        if start < len(order):
            batches.append(order[start:])
    else:
        batches, i = [], 0
        while i < len(order):
            b = order[i:i + batch_size]
            if 0 < halve_above_frames < n[b[-1]]:
                b = b[:max(1, batch_size // 2)]
            batches.append(b)
            i += len(b)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [b.tolist() for b in batches]


def padding_efficiency(batches: Iterable[Sequence[int]], n_frames: Sequence[int]) -> float:
    """Real frames / padded frames (sum of count x longest) over ``batches``: 1.0 = no padding."""
    n = np.asarray(n_frames, dtype=np.int64)
    real = padded = 0
    for b in batches:
        lengths = n[np.asarray(b, dtype=np.int64)]
        real += int(lengths.sum())
        padded += len(lengths) * int(lengths.max(initial=0))
    return real / padded if padded else 1.0


# --------------------------------------------------------------------------------------------------
# collate


def _frames_array(frames, column: str) -> np.ndarray:
    # a numpy (T, D) or Parquet's list of D-lists; read-only (Arrow-backed) is fine: model_frames
    # never writes its input. Log-mel is 80 wide; SSL features keep their float16 until model_frames.
    x = np.asarray(frames, dtype=np.float32 if column == "fbank" else None)
    if column == "waveform" and x.ndim == 1:  # Parquet's list<int16>: samples as (T, 1) frames
        x = x[:, None]
    if x.ndim != 2 or (column == "fbank" and x.shape[1] != FBANK_DIM):
        raise ValueError(f"{column} must be (T, {FBANK_DIM if column == 'fbank' else 'D'}), got shape {x.shape}")
    return x


def _truncate_ids(ids: np.ndarray, max_tokens: Optional[int]) -> np.ndarray:
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    return np.concatenate([ids[:max_tokens - 1], ids[-1:]])  # keep the closing special token


def collate(rows: Sequence[dict], *, max_frames: int, pad_token_id: int, masking=None,
            mask_token_id: Optional[int] = None, vocab_size: Optional[int] = None,
            special_token_ids: Optional[Sequence[int]] = None,
            generator: Optional[torch.Generator] = None,
            max_tokens: Optional[int] = None, frontend: str = "kaldi") -> dict[str, torch.Tensor]:
    """Rows (dicts with ``input_ids``, their frames under ``audio_column(frontend)`` — ``fbank``,
    ``ssl`` or ``waveform`` (samples: (B, T, 1) frames, ``max_frames`` samples) — and optionally
    ``label``) → a padded batch.

    Frames are cropped to ``max_frames`` *before* delta + per-utterance normalization, so the model
    sees exactly what a shorter utterance would give; ``frontend`` is the data set's (``DataSet.frontend``),
    whose delta and normalization apply. Text longer than ``max_tokens`` keeps its
    closing token. Returns input_ids/attention_mask (B, L) long, frames (B, T, audio_dim) float32,
    frame_mask (B, T) bool and labels (B,) float32 when every row has one (classification callers
    cast to long). With a ``MaskingConfig`` (needs mask_token_id, vocab_size, special_token_ids and
    a CPU ``generator``) input_ids and frames are the masked ones and mlm_labels, acoustic_mask and
    target_frames (the unmasked frames) are added.
    """
    if not rows:
        raise ValueError("collate got no rows")
    col = audio_column(frontend)
    feats = [torch.from_numpy(model_frames(_frames_array(r[col], col)[:max_frames], frontend)) for r in rows]
    ids = [_truncate_ids(np.asarray(r["input_ids"], dtype=np.int64), max_tokens) for r in rows]
    B, T, L = len(rows), max(len(f) for f in feats), max(len(i) for i in ids)

    frames = torch.zeros(B, T, feats[0].shape[1], dtype=torch.float32)
    frame_mask = torch.zeros(B, T, dtype=torch.bool)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, (f, i) in enumerate(zip(feats, ids)):
        frames[b, :len(f)] = f
        frame_mask[b, :len(f)] = True
        input_ids[b, :len(i)] = torch.from_numpy(i)
        attention_mask[b, :len(i)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "frames": frames,
             "frame_mask": frame_mask}
    if all(r.get("label") is not None for r in rows):
        batch["labels"] = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)

    if masking is not None:
        if generator is None or mask_token_id is None or vocab_size is None or special_token_ids is None:
            raise ValueError("masking needs generator, mask_token_id, vocab_size and special_token_ids")
        special = torch.isin(input_ids, torch.as_tensor(list(special_token_ids))) | ~attention_mask.bool()
        batch["input_ids"], batch["mlm_labels"] = mask_tokens(
            input_ids, special, mask_token_id=mask_token_id, vocab_size=vocab_size, generator=generator,
            mask_prob=masking.token_mask_prob, replace_prob=masking.token_replace_prob,
            random_prob=masking.token_random_prob, special_token_ids=special_token_ids)
        batch["frames"], batch["acoustic_mask"] = mask_frames(frames, frame_mask, masking, generator=generator)
        batch["target_frames"] = frames
    return batch


# --------------------------------------------------------------------------------------------------
# the per-worker Parquet feed


def split_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether split ``name`` is selected by ``patterns`` (fnmatch; none = all). A plain name also
    selects its LibriSpeech-style subsets: "train" matches train-clean-100 and train-other-500."""
    return not patterns or any(fnmatch(name, p) or ("*" not in p and name.startswith(p + "-"))
                               for p in patterns)


def _list_column_to_numpy(col: pa.ChunkedArray, inner: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A list<…> column → (flat values, offsets) without a Python loop over rows or frames."""
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten()  # honours slicing, unlike .values
    if inner:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if inner:
        flat = flat.reshape(-1, inner)
    return flat, offsets - offsets[0]


class PretrainBatches:
    """This worker's share of a Parquet data set as an endless stream of length-bucketed batches.

    ``split`` is a comma-separated list of split names or fnmatch patterns ("" = all; see
    ``split_matches``). Row groups (single rows when there are fewer than 8 row groups per worker)
    are permuted once with ``seed`` and strided by rank, so a worker reads only its own row groups.
    They are grouped into *pools* of about ``pool_rows`` rows; a pool is read whole (one pool in
    memory at a time) and bucketed by length. Pool membership and the batches' lengths never change,
    so every epoch has the same number of batches; each epoch shuffles pool order and batch order.
    ``batches_per_epoch`` is the minimum over ranks (every rank computes all ranks' counts from the
    ``n_frames`` column alone), so DDP ranks always take the same number of steps.
    """

    ROW_GROUPS_PER_WORKER = 8  # below this, stride rows instead of row groups to keep ranks balanced

    def __init__(self, data_dir: str | Path, *, rank: int, world_size: int, seed: int,
                 split: str = "train", batch_size: int = 8, max_frames_per_batch: int = 0,
                 max_frames: int = 3000, pool_rows: int = 1024, halve_above_frames: int = 0,
                 drop_longer: bool = False, columns: Optional[Sequence[str]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.max_frames_per_batch = batch_size, max_frames_per_batch
        self.halve_above_frames = halve_above_frames
        self.files = list_shards(data_dir)  # URI strings for a data set on s3://, gs://, file://
        self.audio = audio_format(read_report(data_dir))  # its frames' column: fbank or ssl
        self.columns = list(columns or ("input_ids", self.audio.column))
        # One pyarrow filesystem for every read (an S3 client per row group would be slow).
        self._fs = storage.resolve(data_dir)[0] if storage.is_uri(data_dir) else None

        # The index: only the small columns are read (n_frames, split), never the frames.
        n_frames, keep, rg_of_row, self.row_groups = [], [], [], []  # row_groups: (file, rg, start)
        wanted = [s for s in split.split(",") if s]  # "" = every split
        seen_splits = set()
        for f in range(len(self.files)):
            pf = self._parquet(f)
            t = pf.read(columns=["n_frames", "split"])
            splits = t.column("split").to_numpy(zero_copy_only=False)
            seen_splits.update(splits.tolist())
            n_frames.append(t.column("n_frames").to_numpy().astype(np.int64))
            keep.append(np.isin(splits, [u for u in set(splits.tolist()) if split_matches(u, wanted)]))
            start = 0
            for g in range(pf.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                rg_of_row.append(np.full(rows, len(self.row_groups)))
                self.row_groups.append((f, g, start))
                start += rows
        raw = np.concatenate(n_frames) if n_frames else np.zeros(0, np.int64)
        self.raw_frames = raw  # as stored: the size of a row's frames
        self.n_frames = np.minimum(raw, max_frames)  # what the model sees after cropping
        self.rg_of_row = np.concatenate(rg_of_row) if rg_of_row else np.zeros(0, np.int64)
        self.row_start = np.array([0] + [len(x) for x in n_frames]).cumsum()  # global row of file f
        keep = np.concatenate(keep) if keep else np.zeros(0, bool)
        self.n_dropped = int((keep & (raw > max_frames)).sum()) if drop_longer else 0
        rows = np.flatnonzero(keep & ~(raw > max_frames) if drop_longer else keep)
        if len(rows) == 0:
            dropped = f", {self.n_dropped} dropped as longer than max_frames={max_frames}" if self.n_dropped else ""
            raise ValueError(f"{str(data_dir)!r} has no rows of split {split!r} "
                             f"(splits present: {sorted(seen_splits)}{dropped})")

        # Units: whole row groups when there are enough, else single rows.
        groups = np.unique(self.rg_of_row[rows])
        if len(groups) >= self.ROW_GROUPS_PER_WORKER * world_size:  # rows are sorted, so are groups
            units = np.split(rows, np.flatnonzero(np.diff(self.rg_of_row[rows])) + 1)
        else:
            units = [rows[i:i + 1] for i in range(len(rows))]
        perm = np.random.default_rng([seed, 0x5EED]).permutation(len(units))
        self._pools = {}  # rank -> list of row arrays
        for r in range(world_size):
            mine = [units[i] for i in perm[r::world_size]]
            pools, cur, n_cur = [], [], 0
            for u in mine:
                cur.append(u)
                n_cur += len(u)
                if n_cur >= pool_rows:
                    pools.append(np.concatenate(cur))
                    cur, n_cur = [], 0
            if cur:
                pools.append(np.concatenate(cur))
            self._pools[r] = pools
        counts = {r: [len(self._bucket(r, p, 0)) for p in range(len(ps))] for r, ps in self._pools.items()}
        self.batches_per_epoch = min(sum(c) for c in counts.values())
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows of split {split!r} are too few for {world_size} workers")
        self.pools = self._pools[rank]
        self.n_rows = sum(len(p) for p in self.pools)

    def _parquet(self, f: int) -> pq.ParquetFile:
        if self._fs is None:
            return pq.ParquetFile(self.files[f])
        return pq.ParquetFile(storage.resolve(self.files[f])[1], filesystem=self._fs)

    def _bucket(self, rank: int, pool: int, epoch: int) -> list[list[int]]:
        """Batches of pool ``pool`` of ``rank`` in ``epoch``, as positions within the pool."""
        rows = self._pools[rank][pool]
        return bucket_batches(self.n_frames[rows], batch_size=self.batch_size,
                              max_frames_per_batch=self.max_frames_per_batch,
                              seed=derive_seed(self.seed, rank, pool), epoch=epoch,
                              halve_above_frames=self.halve_above_frames)

    def _pool_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.pools))

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """The first ``batches_per_epoch`` batches of this rank in ``epoch``: (pool, positions)."""
        out = []
        for p in self._pool_order(epoch):
            out += [(int(p), b) for b in self._bucket(self.rank, int(p), epoch)]
            if len(out) >= self.batches_per_epoch:
                break
        return out[:self.batches_per_epoch]

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Of this rank's batches in ``epoch`` (frames after cropping)."""
        return padding_efficiency([self.pools[p][b] for p, b in self.plan(epoch)], self.n_frames)

    def _read_group(self, g: int, rows: np.ndarray, columns: Sequence[str]) -> tuple[np.ndarray, pa.Table]:
        """Those of ``rows`` in row group ``g`` (global row numbers, in ``rows``' order) and their table."""
        f, rg, start = self.row_groups[g]
        want = rows[self.rg_of_row[rows] == g]
        t = self._parquet(f).read_row_group(int(rg), columns=list(columns))
        return want, t.take(pa.array(want - self.row_start[f] - start))

    def _read_pool(self, pool: int, columns: Optional[Sequence[str]] = None) -> list[dict]:
        """Rows of one pool (reading each of its row groups once), in pool order."""
        rows, columns = self.pools[pool], list(columns or self.columns)
        out: dict[int, dict] = {}
        for g in np.unique(self.rg_of_row[rows]):
            want, t = self._read_group(g, rows, columns)
            cols = {}
            for name in columns:
                if name == self.audio.column:
                    cols[name] = _list_column_to_numpy(t.column(name), inner=self.audio.width)
                elif name == "input_ids":
                    cols[name] = _list_column_to_numpy(t.column(name))
                else:
                    cols[name] = t.column(name).to_pylist()
            for i, row in enumerate(want):
                rec = {}
                for name, col in cols.items():
                    if isinstance(col, tuple):
                        flat, offs = col
                        rec[name] = flat[offs[i]:offs[i + 1]]
                    else:
                        rec[name] = col[i]
                out[int(row)] = rec
        return [out[int(r)] for r in rows]

    def position(self, index: int) -> tuple[int, int]:
        """Global batch index → (epoch, batches to skip in that epoch)."""
        return divmod(index, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[dict]]:
        return self.iter_from(0)

    def schedule(self, index: int) -> Iterator[tuple[int, list[tuple[int, list[int]]]]]:
        """From global batch ``index`` on, forever: (pool, [(global batch index, positions), ...]), one
        entry per pool in the order the feed reads them (a pool appears once per epoch)."""
        epoch, skip = self.position(index)
        while True:
            first = epoch * self.batches_per_epoch
            group, last_pool = [], None
            for k, (pool, positions) in enumerate(self.plan(epoch)):
                if k < skip:
                    continue
                if pool != last_pool and group:
                    yield last_pool, group
                    group = []
                group.append((first + k, positions))
                last_pool = pool
            if group:
                yield last_pool, group
            epoch, skip = epoch + 1, 0

    def iter_from(self, index: int) -> Iterator[list[dict]]:
        """Batches (lists of row dicts) from global batch ``index`` on, forever. Pools before the
        resume position are never read."""
        for pool, batches in self.schedule(index):
            rows = self._read_pool(pool)  # the previous pool is released
            for _, positions in batches:
                yield [rows[i] for i in positions]

    # ---- the parts of a pool that feed processes read side by side (``feed``)

    def frame_offsets(self, pool: int) -> np.ndarray:
        """Where each row of ``pool`` starts in the pool's flat (frames, width) array (uncropped frames)."""
        return np.concatenate([[0], np.cumsum(self.raw_frames[self.pools[pool]])])

    def max_pool_frames(self) -> int:
        return max(int(self.raw_frames[rows].sum()) for rows in self.pools)

    def read_audio_part(self, pool: int, part: int, parts: int, out: np.ndarray) -> None:
        """Write the frames of part ``part`` of ``parts`` of ``pool`` into ``out`` (the pool's flat
        (frames, width) array of the column's dtype, rows at ``frame_offsets``). Parts are whole row groups of about
        equal frames, so each row group is read and decoded by one process only."""
        rows = self.pools[pool]
        groups = np.unique(self.rg_of_row[rows])
        frames = np.array([self.raw_frames[rows[self.rg_of_row[rows] == g]].sum() for g in groups])
        cum = np.cumsum(frames) - frames / 2  # each group's midpoint decides its part
        mine = groups[np.minimum((cum * parts // max(frames.sum(), 1)).astype(np.int64), parts - 1) == part]
        at = {int(r): i for i, r in enumerate(rows)}
        offsets = self.frame_offsets(pool)
        for g in mine:
            want, t = self._read_group(g, rows, [self.audio.column])
            flat, offs = _list_column_to_numpy(t.column(self.audio.column), inner=self.audio.width)
            f = self.row_groups[g][0]
            for i, row in enumerate(want):
                n, dst = offs[i + 1] - offs[i], at[int(row)]
                if n != self.raw_frames[row]:
                    raise ValueError(f"{self.files[f]}: row {int(row - self.row_start[f])} has {n} "
                                     f"frames but its n_frames column says {int(self.raw_frames[row])}")
                out[offsets[dst]:offsets[dst + 1]] = flat[offs[i]:offs[i + 1]]
