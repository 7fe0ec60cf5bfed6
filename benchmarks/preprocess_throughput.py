"""Preprocessing throughput: a plain single-process loop vs the Ray Data pipeline, same corpus, one run.

    python benchmarks/preprocess_throughput.py [--sizes 6000 24000] [--repeats 2] [--unique 400]
        [--num-cpus 2] [--workdir DIR] [--baseline DIR]

Synthesizes ``--unique`` eSpeak utterances (LibriSpeech layout) once, then builds CSV manifests of each
size by cycling over them (every row is decoded, featurized, tokenized and written on its own; the
page cache holds the small corpus either way). Both modes do the same work — ``featurize_row`` on every
row and zstd Parquet shards of ``rows_per_shard`` rows — with the same tokenizer. Each mode runs in its
own process so its peak RSS is its own; for the pipeline that is the driver's (features never pass
through it). The pipeline's time includes actor start-up but not ``ray.init``, which is shown apart.
CPU ms per utterance (all processes of each mode) is printed too: unlike wall time it hardly depends
on what else the machine runs, so it tells what an idle box would give when the load average is high.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _role(pid: int) -> str:
    """What a process of the pipeline is: the driver, an actor (Ray's process title), a Ray daemon."""
    if pid == os.getpid():
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if cmd.startswith("ray::"):
        return "actors" if "ShardWriter" in cmd or "MapWorker" in cmd else "workers"
    if "default_worker.py" in cmd:  # a worker before Ray titles it (its arguments name the raylet)
        return "workers"
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env"):
        if name in cmd:
            return name
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"


def _tree_cpu() -> dict:
    """{pid: (role, CPU seconds)} for this process and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {p for p, (ppid, _) in stats.items() if ppid in frontier} - tree
    return {p: (_role(p), stats[p][1]) for p in tree}


class _CpuSampler(threading.Thread):
    """CPU used by the driver and every Ray process it started (actors included, which Ray Data
    retires before the run returns), sampled every 0.5 s: misses at most 0.5 s per exited process."""

    def __init__(self):
        super().__init__(daemon=True)
        self.start_cpu, self.last, self.done = _tree_cpu(), {}, threading.Event()
        self.lock = threading.Lock()

    def run(self):
        while not self.done.wait(0.5):
            self._update()
        self.own_cpu = time.thread_time()  # scanning /proc is the benchmark's work, not the driver's

    def _update(self):
        # A worker becomes an actor once Ray titles it; that sticks (titles change again at exit).
        with self.lock:
            for p, (role, cpu) in _tree_cpu().items():
                seen = self.last.get(p, ("?", 0.0))[0]
                self.last[p] = (seen if seen == "actors" or role == "?" else role, cpu)

    def total(self) -> float:
        """CPU seconds of the whole tree since the start, now (the benchmark's own scans included)."""
        self._update()
        with self.lock:
            return sum(cpu - self.start_cpu.get(p, (role, 0.0))[1] for p, (role, cpu) in self.last.items())

    def stop(self) -> dict:
        """CPU seconds used since the start, by role (see ``_role``)."""
        self.done.set()
        self.join()
        self._update()
        by_role = {}
        for p, (role, cpu) in self.last.items():
            by_role[role] = by_role.get(role, 0.0) + cpu - self.start_cpu.get(p, (role, 0.0))[1]
        by_role["driver"] -= self.own_cpu
        by_role["sampler (not counted)"] = self.own_cpu
        return by_role


def run_timed(sampler: "_CpuSampler", *args, **kwargs) -> tuple[dict, float]:
    """``run_preprocess(*args, **kwargs)`` and the CPU seconds ``sampler`` counted while it featurized:
    the measured ratios time featurizing only (``report["throughput"]["featurize_wall_s"]``), so CPU
    over that same span (not the tokenizer copy before it, nor the report after it) projects them."""
    from ctal.distributed import preprocess

    featurize, span = preprocess._featurize, {}

    def timed_featurize(*a, **kw):
        span["start"] = sampler.total()
        try:
            return featurize(*a, **kw)
        finally:
            span["cpu_s"] = sampler.total() - span["start"]

    preprocess._featurize = timed_featurize
    try:
        return preprocess.run_preprocess(*args, **kwargs), span["cpu_s"]
    finally:
        preprocess._featurize = featurize


def _child_loop(manifest: str, out: str, tokenizer: str) -> dict:
    import pyarrow.parquet as pq
    import torch

    from ctal.config import DataConfig
    from ctal.corpora import read_corpus
    from ctal.data import PARQUET_SCHEMA, records_to_table
    from ctal.featurize import featurize_row
    from ctal.tokenizer import load_tokenizer

    # One thread, like each pipeline actor: a second one gains <5 % on an idle box, and under load
    # OpenMP's spin-waiting made the loop several times slower, which would flatter the pipeline.
    torch.set_num_threads(1)
    cfg = DataConfig(tokenizer=tokenizer)
    rows = read_corpus("csv", manifest)
    tok = load_tokenizer(tokenizer)
    out = Path(out)
    out.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    audio_s = 0.0
    for shard, start in enumerate(range(0, len(rows), cfg.rows_per_shard)):
        writer, pending = None, []
        for row in rows[start:start + cfg.rows_per_shard]:
            record, _ = featurize_row(row, tok, cfg)
            if record is None:
                continue
            audio_s += record["duration_s"]
            pending.append(record)
            if len(pending) == 64:  # the pipeline's row-group size
                writer = writer or pq.ParquetWriter(out / f"part-{shard:05d}.parquet", PARQUET_SCHEMA,
                                                    compression="zstd")
                writer.write_table(records_to_table(pending))
                pending = []
        if pending:
            writer = writer or pq.ParquetWriter(out / f"part-{shard:05d}.parquet", PARQUET_SCHEMA,
                                                compression="zstd")
            writer.write_table(records_to_table(pending))
        if writer is not None:
            writer.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"utterances": len(rows), "audio_s": audio_s, "wall_s": wall, "cpu_s": cpu,
            "peak_rss_mb": _peak_rss_mb()}


def _child_pipeline(manifest: str, out: str, tokenizer: str, num_cpus: int) -> dict:
    import ray

    from ctal.config import DataConfig
    from ctal.corpora import read_corpus

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    rows = read_corpus("csv", manifest)
    sampler = _CpuSampler()
    sampler.start()
    report, featurize_cpu_s = run_timed(sampler, "csv", manifest, out, DataConfig(tokenizer=tokenizer), rows=rows,
                                        verbose=False)
    cpu_by_role = sampler.stop()
    ray.shutdown()
    t = report["throughput"]
    return {"utterances": report["counts"]["in"], "audio_s": report["hours"] * 3600,
            "wall_s": t["featurize_wall_s"],
            "cpu_s": sum(v for k, v in cpu_by_role.items() if not k.endswith("(not counted)")),
            "featurize_cpu_s": featurize_cpu_s,
            "cpu_s_by_role": {k: round(v, 2) for k, v in sorted(cpu_by_role.items(), key=lambda kv: -kv[1])},
            "ray_init_s": t_init,
            "actors": t["actors"], "shards": len(report["shards"]), "peak_rss_mb": _peak_rss_mb()}


def _run_child(*args, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None  # Ray's workers inherit it
    res = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _write_manifest(rows: list[dict], n: int, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "audio_path", "text", "speaker", "split"])
        for i in range(n):
            r = rows[i % len(rows)]
            w.writerow([f"{r['id']}-c{i // len(rows)}", r["audio_path"], r["text"], r["speaker"], r["split"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 24000])
    p.add_argument("--unique", type=int, default=400, help="distinct synthesized utterances")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per mode and size; the fastest counts")
    p.add_argument("--workdir", default=None, help="keeps the synthesized corpus (default: a temp dir)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also run the pipeline of the ctal checkout in DIR (PYTHONPATH=DIR), interleaved")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, *rest = args.child
        result = _child_loop(*rest) if mode == "loop" else _child_pipeline(*rest[:3], int(rest[3]))
        print(json.dumps(result))
        return

    from ctal.corpora import read_corpus
    from ctal.corpora.synthetic import synthesize
    from ctal.tokenizer import train_bpe_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ctal-bench-"))
    corpus = work / "corpus"
    if not (corpus / "synthetic_meta.csv").is_file():
        info = synthesize("librispeech", corpus, args.unique, seed=0)
        print(f"synthesized {args.unique} utterances ({info['audio_s']:.0f} s of audio) "
              f"in {info['wall_s']:.0f} s")
    rows = read_corpus("librispeech", corpus)
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        train_bpe_tokenizer([r["text"] for r in rows], 30000, tok_dir)

    results = []
    load_before = os.getloadavg()[0]
    for n in args.sizes:
        manifest = work / f"manifest-{n}.csv"
        _write_manifest(rows, n, manifest)
        best = {}
        for _ in range(args.repeats):  # alternate the modes; keep each one's fastest run
            for mode in ("loop", "pipeline") + (("baseline",) if args.baseline else ()):
                out = work / f"{mode}-{n}-{time.time_ns()}"
                extra = (args.num_cpus,) if mode != "loop" else ()
                r = _run_child("loop" if mode == "loop" else "pipeline", manifest, out, tok_dir, *extra,
                               pythonpath=args.baseline if mode == "baseline" else None)
                shutil.rmtree(out, ignore_errors=True)
                if mode not in best or r["wall_s"] < best[mode]["wall_s"]:
                    best[mode] = r
        results.append((n, best["loop"], best["pipeline"], best.get("baseline")))
    load_after = os.getloadavg()[0]
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\npreprocess throughput, {args.num_cpus} CPUs, synthetic LibriSpeech-layout corpus "
          f"({len(rows)} distinct utterances, cycled)")
    print(f"{'utterances':>10} {'audio h':>8} | {'loop utt/s':>10} {'x rt':>6} {'RSS MB':>7} | "
          f"{'pipe utt/s':>10} {'x rt':>6} {'driver RSS':>10} {'ray.init s':>10} | {'ratio':>5} | "
          f"{'CPU ms/utt loop':>15} {'pipe':>5}")
    for n, loop, pipe, _ in results:
        lr, pr = loop["utterances"] / loop["wall_s"], pipe["utterances"] / pipe["wall_s"]
        print(f"{n:>10} {loop['audio_s'] / 3600:>8.2f} | {lr:>10.0f} {loop['audio_s'] / loop['wall_s']:>6.0f} "
              f"{loop['peak_rss_mb']:>7.0f} | {pr:>10.0f} {pipe['audio_s'] / pipe['wall_s']:>6.0f} "
              f"{pipe['peak_rss_mb']:>10.0f} {pipe['ray_init_s']:>10.1f} | {pr / lr:>5.2f} | "
              f"{1e3 * loop['cpu_s'] / n:>15.2f} {1e3 * pipe['cpu_s'] / n:>5.2f}")
    print(f"\nCPU ms per utterance, by process (projected idle ratio = {args.num_cpus} x loop CPU / pipeline "
          "CPU, the most the pipeline could reach with every core busy to the end):")
    for n, loop, pipe, base in results:
        for name, r in (("pipeline", pipe), (f"baseline {args.baseline}", base)):
            if r is None:
                continue
            roles = ", ".join(f"{k} {1e3 * v / n:.2f}" for k, v in r["cpu_s_by_role"].items() if 1e3 * v / n >= 0.005)
            print(f"  {n:>6} {name}: {1e3 * r['cpu_s'] / n:.2f} ({roles}); loop {1e3 * loop['cpu_s'] / n:.2f}; "
                  f"projected {args.num_cpus * loop['cpu_s'] / r['cpu_s']:.2f}x, measured "
                  f"{loop['wall_s'] / r['wall_s']:.2f}x")
            if "featurize_cpu_s" in r:
                print(f"  {'':>6} {'':>{len(name)}}  featurizing only (the span the ratio times): "
                      f"{1e3 * r['featurize_cpu_s'] / n:.2f}, projected "
                      f"{args.num_cpus * loop['cpu_s'] / r['featurize_cpu_s']:.2f}x")
    print("(pipeline time includes actor start-up, not ray.init; RSS is each process's peak, the "
          "pipeline's being the Ray driver's;\n pipeline CPU: the driver and every Ray process during "
          "run_preprocess, actor start-up included)")
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} "
          "cores (other processes on the machine distort both rates)")
    print(json.dumps([{"utterances": n, "loop": lo, "pipeline": pi, "baseline": b} for n, lo, pi, b in results]))


if __name__ == "__main__":
    main()
