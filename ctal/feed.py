"""The feed: a pretraining worker's batches (ctal.batching.PretrainBatches) built beside the training
step, in a background thread (``prefetch``) or in processes that share the reading through shared
memory (``feed``): the same batches either way, in the same order.
"""
from __future__ import annotations

import math
import shutil
import threading
import time
from queue import Full, Queue
from typing import Iterator

import torch

from .batching import PretrainBatches


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (order unchanged).

    Reading Parquet and collating release the GIL for most of their time, so the next batch is
    built while the model trains on the current one. Closing the returned generator stops and joins
    the thread (a daemon thread killed inside torch at exit aborts the process).
    """
    q: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def work():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="ctal-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class FeedError(RuntimeError):
    """A feed process failed; the message names what went wrong."""


SHM = "/dev/shm"


def check_shared_memory(nbytes: int, where: str = SHM) -> None:
    """FeedError naming ``where`` when it has less than ``nbytes`` free: torch's shared tensors live
    there, and a full one fails mid-write with a message that never says where (or with SIGBUS)."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no such mount (not Linux): torch finds its own way
    if free < nbytes:
        raise FeedError(f"the parallel feed needs {nbytes / 2**20:.0f} MiB of shared memory and {where} has "
                        f"{free / 2**20:.0f} MiB free: give it more (docker run --shm-size=2g; Kubernetes: an "
                        "emptyDir with medium Memory on /dev/shm), lower feed_workers, or set feed_workers=0")


class _ProcessFeed(torch.utils.data.IterableDataset):
    """What each of ``workers`` DataLoader processes runs: for every pool in feed order, read its
    share of the pool's row groups into the pool's shared-memory slot, wait at a barrier until every
    share is there, then build the batches whose index (counted from ``start``) is its own modulo
    ``workers``. DataLoader asks the processes in turn, so the batches come out in the feed's order.

    Two slots suffice: a process writes pool j + 1's share only after the barrier of pool j, which
    every process reaches only after building its batches of pool j - 1 (the slot's old pool).
    Batches never alias a slot (``collate`` builds new tensors).

    A batch travels in a ring of ``ring`` shared buffers per process, allocated once before the
    processes start: the process packs its tensors into a buffer and hands DataLoader only where
    they lie (handing it tensors costs a fresh shared-memory segment and a file descriptor passed
    per tensor per batch, whose page faults cost as much CPU as building the batch). A process
    builds its batch k only when asked, and DataLoader asks for it as it hands over batch
    k - prefetch_factor of that process, which ``feed`` copies out at once: a ring longer than
    ``prefetch_factor`` is never overwritten while being read. A batch larger than its buffer (the
    size is a bound from the data's lengths) goes DataLoader's own way.
    """

    ALIGN = 64

    def __init__(self, data: PretrainBatches, make_batch, start: int, workers: int, context, ring: int):
        self.data, self.make_batch, self.start, self.workers, self.ring = data, make_batch, start, workers, ring
        n, fmt = max(data.max_pool_frames(), 1), data.audio
        dtype = torch.float16 if fmt.column == "ssl" else torch.float32  # as stored
        size = -(-self.buffer_bytes(data) // self.ALIGN) * self.ALIGN  # every buffer starts aligned
        check_shared_memory(2 * n * fmt.width * dtype.itemsize + workers * ring * size)
        self.slots = [torch.empty(n, fmt.width, dtype=dtype).share_memory_() for _ in range(2)]
        self.rings = torch.empty(workers, ring, size, dtype=torch.uint8).share_memory_()
        self.barrier = context.Barrier(workers)
        self.error = context.Array("c", 4096)  # the first failure's message, for the other processes

    @staticmethod
    def buffer_bytes(data: PretrainBatches, max_tokens: int = 520) -> int:
        """A bound on one batch's bytes: frames + target frames (float32, audio_dim each) and two
        frame masks per padded frame, three int64 token tensors per padded token (compile's
        bucket padding included)."""
        longest = int(data.n_frames.max()) + 64
        if data.max_frames_per_batch > 0:
            padded = max(data.max_frames_per_batch, longest)
            utterances = max(1, data.max_frames_per_batch // max(1, int(data.n_frames.min())))
        else:
            padded, utterances = data.batch_size * longest, data.batch_size
        audio_dim = data.audio.model_dims()["audio_dim"]
        return padded * (2 * audio_dim * 4 + 2) + utterances * max_tokens * 3 * 8 + 16 * 1024

    def _pack(self, batch: dict, w: int, k: int) -> dict:
        buf = self.rings[w, k % self.ring]
        places, end = {}, 0
        for key, t in batch.items():
            if torch.is_tensor(t):
                start = -(-end // self.ALIGN) * self.ALIGN
                places[key], end = (start, t.dtype, tuple(t.shape)), start + t.nbytes
        if end > buf.numel():
            return batch
        for key, (start, dtype, shape) in places.items():
            buf[start:start + batch[key].nbytes].view(dtype).view(shape).copy_(batch[key])
        return {"_ring": (w, k % self.ring, places), **{k_: v for k_, v in batch.items() if k_ not in places}}

    def unpack(self, batch: dict, pin_memory: bool) -> dict:
        """In the trainer: the batch's tensors copied out of the ring (into pinned memory if asked)."""
        if "_ring" not in batch:
            return batch
        w, slot, places = batch.pop("_ring")
        buf = self.rings[w, slot]
        for key, (start, dtype, shape) in places.items():
            view = buf[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            batch[key] = torch.empty(shape, dtype=dtype, pin_memory=pin_memory).copy_(view)
        return batch

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        try:
            col = self.data.audio.column
            for j, (pool, batches) in enumerate(self.data.schedule(self.start)):
                slot = self.slots[j % 2].numpy()
                self.data.read_audio_part(pool, w, self.workers, slot)
                ids = self.data._read_pool(pool, columns=["input_ids"])
                offsets = self.data.frame_offsets(pool)
                self.barrier.wait()
                for index, positions in batches:
                    k, mine = divmod(index - self.start, self.workers)
                    if mine == w:
                        rows = [{"input_ids": ids[p]["input_ids"], col: slot[offsets[p]:offsets[p + 1]]}
                                for p in positions]
                        yield self._pack(self.make_batch(rows, index), w, k)
        except threading.BrokenBarrierError:
            raise FeedError(f"feed process {w} stopped: another one failed: "
                            f"{self.error.value.decode(errors='replace')}") from None
        except Exception as e:
            with self.error.get_lock():
                if not self.error.value:
                    self.error.value = f"{type(e).__name__}: {e}".encode()[:4095]
            self.barrier.abort()
            raise


def feed(data: PretrainBatches, make_batch, start: int, *, workers: int = 0, pin_memory: bool = False,
         prefetch_factor: int = 2) -> Iterator:
    """``make_batch(rows, index)`` of every batch of ``data`` from global batch ``start`` on, in order.

    ``workers`` = 0: built in one background thread (``prefetch``), one core's worth. ``workers`` > 0:
    built in that many processes (torch's DataLoader), which also share the reading: each pool's row
    groups are read once, split among the processes, into shared memory. The batches are the same
    either way: ``make_batch`` must depend only on its rows and index (seed its masks from the index).
    ``pin_memory`` pins the batches' tensors for an asynchronous copy to the GPU. Closing the
    returned generator stops the thread or the processes.
    """
    if workers == 0:
        def built():
            for index, rows in enumerate(data.iter_from(start), start):
                b = make_batch(rows, index)
                yield {k: v.pin_memory() if pin_memory and torch.is_tensor(v) else v for k, v in b.items()}
        yield from prefetch(built())
        return
    import multiprocessing

    context = multiprocessing.get_context("fork")  # spawn: no faster, seconds of start-up, re-runs __main__
    dataset = _ProcessFeed(data, make_batch, start, workers, context, ring=prefetch_factor + 2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=prefetch_factor, multiprocessing_context=context,
                                         # its own generator: DataLoader draws its workers' seeds from
                                         # it, which must not move the trainer's (dropout) RNG
                                         generator=torch.Generator().manual_seed(start))
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except Exception as e:  # DataLoader's re-raise carries the worker's traceback: say it in one line
                message = dataset.error.value.decode(errors="replace")
                if message:
                    raise FeedError(f"the feed failed: {message}") from None
                for _ in range(20):  # a process that was killed may take a moment to be seen dead
                    dead = [p for p in getattr(it, "_workers", []) if p.exitcode not in (None, 0)]
                    if dead:
                        break
                    time.sleep(0.1)
                if dead:  # killed (e.g. by the OOM killer) while a batch was on its way
                    raise FeedError("feed process(es) " + ", ".join(f"pid {p.pid} (exit code {p.exitcode})"
                                                                    for p in dead)
                                    + f" died: {type(e).__name__}: {e}".splitlines()[0]) from None
                raise
            batch = dataset.unpack(batch, pin_memory)
            yield batch
    finally:
        it._shutdown_workers()
