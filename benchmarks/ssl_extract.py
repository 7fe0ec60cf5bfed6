"""SSL feature extraction: a plain single-process loop vs the Ray Data pipeline, same files, one run.

    python benchmarks/ssl_extract.py [--size tiny|base] [--norm layer|group] [--layers 2,4]
        [--unique 48] [--utterances 192] [--num-cpus 2] [--loop-threads 1] [--batch-seconds 60]
        [--repeats 1] [--gpu [--gpu-share 0.5]] [--workdir DIR]

The front end of issue 31 (``features.frontend=ssl``): a randomly initialized WavLM saved as a local
Hugging Face folder is the upstream, ``--size tiny`` (``ctal.upstream.save_random_upstream``: hidden
64, 4 layers, 16-channel CNN) or ``--size base`` (WavLM base's shape from transformers' ``WavLMConfig``:
hidden 768, 12 layers, 12 heads, FFN 3072, 512-channel CNN; ~95 M parameters). ``--norm layer`` is the
stable-layer-norm layout of the large models, whose batches are padded; ``--norm group`` wav2vec2-base's,
which ``ctal.upstream.Upstream`` runs one utterance per forward pass in both modes. Random weights
compute what trained ones do, so times carry over; how well the features compress need not.

``--unique`` eSpeak utterances (LibriSpeech layout) are synthesized once and cycled to ``--utterances``
rows of a CSV manifest. Both modes do the same work per row, each in its own process, from the same
tokenizer:

- loop: ``featurize_rows([row])`` utterance by utterance, i.e. decode (soundfile), checks, tokenize,
  resample to 16 kHz, ``Upstream([waveform])`` (one utterance per forward pass), then zstd Parquet
  shards of the same schema and row groups; timed from loading the model (``load_upstream``, as an
  actor does) to the last shard closed; ``--loop-threads`` torch threads.
- pipeline: ``ctal.distributed.preprocess.run_preprocess`` with the SSL front end: Ray Data actors of
  ``num_cpus_per_task=1`` (one torch thread each), each loading the model once and running
  ``featurize_rows`` on row groups of 64, whose encoder batches are up to ``features.ssl_batch_seconds``
  of audio (``--batch-seconds``; a budget below two utterances, e.g. 0.01, runs one per pass as the
  loop does); its time is ``report.json``'s ``featurize_wall_s`` (actor start-up and model loads
  included, ``ray.init`` and the BPE copy not).

``--gpu`` runs the encoder on CUDA in both modes (``features.ssl_num_gpus=--gpu-share`` per actor, so
0.5 puts two actors on the one GPU; bf16 autocast where the GPU has it, else fp16, as
``ctal.featurize.load_upstream`` picks); without a CUDA device it prints SKIPPED and exits 2.

Also printed: the storage the features take per hour of audio and per kept layer (the Parquet shards
of the pipeline, all columns, and the ``ssl`` column's compressed bytes alone), beside the raw float16
figure (50 frames/s x hidden x 2 bytes x 3600 s) for the model used and for base (768) and large (1024)
widths, and CPU ms per utterance of each mode (all its processes), which a loaded machine moves less
than wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the corpus cycling and the process-tree CPU sampler of the log-mel benchmark, reused as they are
from preprocess_throughput import _CpuSampler, _write_manifest, run_timed  # noqa: E402

WIDTHS = {"tiny": 64, "base": 768, "large": 1024}  # hidden size per kept layer
FRAMES_PER_S = 50  # the standard CNN: 320-sample stride at 16 kHz
MB = 1e6


def save_upstream(size: str, norm: str, path: Path) -> Path:
    """A random WavLM folder (config.json, safetensors, preprocessor_config.json) of ``size``."""
    from transformers.utils import logging as hf_logging

    from ctal.upstream import save_random_upstream

    hf_logging.disable_progress_bar()  # "Writing model shards"
    if size == "tiny":
        return save_random_upstream(path, "wavlm", hidden_size=WIDTHS["tiny"], num_layers=4,
                                    feat_extract_norm=norm)
    # save_random_upstream's CNN and heads are tiny-only: build base's shape here, the same way
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    layer = norm == "layer"
    config = WavLMConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                         feat_extract_norm=norm, do_stable_layer_norm=layer, conv_bias=layer)
    torch.manual_seed(0)
    WavLMModel(config).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=layer).save_pretrained(path)
    return path


def data_config(upstream: str, layers: str, tokenizer: str, gpu_share: float, batch_seconds: float):
    from ctal.config import DataConfig, load_config

    return load_config(DataConfig, [], [f"tokenizer={tokenizer}", "features.frontend=ssl",
                                        f"features.ssl_model={upstream}", f"features.ssl_layers=[{layers}]",
                                        f"features.ssl_num_gpus={gpu_share}",
                                        f"features.ssl_batch_seconds={batch_seconds}"])


class _Timed:
    """The upstream, with the seconds spent inside its calls counted (the encoder's share)."""

    def __init__(self, upstream):
        self.upstream, self.info, self.seconds = upstream, upstream.info, 0.0

    def __call__(self, waveforms):
        t0 = time.perf_counter()
        try:
            return self.upstream(waveforms)
        finally:
            self.seconds += time.perf_counter() - t0


def _child_loop(manifest: str, out: str, upstream: str, layers: str, tokenizer: str, gpu_share: str,
                batch_seconds: str, threads: str) -> dict:
    from dataclasses import asdict

    import pyarrow.parquet as pq
    import torch

    from ctal.corpora import read_corpus
    from ctal.data import audio_format, parquet_schema, records_to_table
    from ctal.featurize import featurize_rows, load_upstream
    from ctal.tokenizer import load_tokenizer

    torch.set_num_threads(int(threads))
    cfg = data_config(upstream, layers, tokenizer, float(gpu_share), float(batch_seconds))
    rows = read_corpus("csv", manifest)
    tok = load_tokenizer(tokenizer)
    out = Path(out)
    out.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    up = load_upstream(cfg.features)  # CUDA when ssl_num_gpus > 0 and there is one, as in the actors
    t_load = time.perf_counter() - t0
    timed = _Timed(up)
    fmt = audio_format({"features": asdict(cfg.features), "upstream": up.info.to_dict()})
    audio_s, written = 0.0, 0
    for shard, start in enumerate(range(0, len(rows), cfg.rows_per_shard)):
        writer, pending = None, []
        for row in rows[start:start + cfg.rows_per_shard]:
            (record, _), = featurize_rows([row], tok, cfg, timed)  # one utterance per forward pass
            if record is None:
                continue
            audio_s, written = audio_s + record["duration_s"], written + 1
            pending.append(record)
            if len(pending) == 64:  # the pipeline's row-group size
                writer = writer or pq.ParquetWriter(out / f"part-{shard:05d}.parquet", parquet_schema(fmt),
                                                    compression="zstd")
                writer.write_table(records_to_table(pending, fmt))
                pending = []
        if pending:
            writer = writer or pq.ParquetWriter(out / f"part-{shard:05d}.parquet", parquet_schema(fmt),
                                                compression="zstd")
            writer.write_table(records_to_table(pending, fmt))
        if writer is not None:
            writer.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"utterances": len(rows), "written": written, "audio_s": audio_s, "wall_s": wall, "cpu_s": cpu,
            "load_s": t_load, "encoder_s": timed.seconds, "device": str(up.device),
            "autocast": str(up.autocast_dtype).replace("torch.", "") if up.autocast_dtype else "fp32",
            "shard_bytes": sum(f.stat().st_size for f in out.glob("part-*.parquet"))}


def _child_pipeline(manifest: str, out: str, upstream: str, layers: str, tokenizer: str, gpu_share: str,
                    batch_seconds: str, num_cpus: str) -> dict:
    import pyarrow.parquet as pq
    import ray

    from ctal.corpora import read_corpus

    gpus = 1 if float(gpu_share) > 0 else 0  # one GPU, shared by 1 / gpu_share actors
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=int(num_cpus), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    rows = read_corpus("csv", manifest)
    sampler = _CpuSampler()
    sampler.start()
    cfg = data_config(upstream, layers, tokenizer, float(gpu_share), float(batch_seconds))
    report, featurize_cpu_s = run_timed(sampler, "csv", manifest, out, cfg, rows=rows, verbose=False)
    cpu_by_role = sampler.stop()
    ray.shutdown()
    shards = [Path(out) / s["file"] for s in report["shards"]]
    ssl_bytes = 0
    for f in shards:  # the ssl column's compressed bytes, from the footers
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema.split(".")[0] == "ssl":
                    ssl_bytes += col.total_compressed_size
    t = report["throughput"]
    return {"utterances": report["counts"]["in"], "written": report["counts"]["written"],
            "audio_s": report["hours"] * 3600, "wall_s": t["featurize_wall_s"], "featurize_cpu_s": featurize_cpu_s,
            "cpu_s_by_role": {k: round(v, 2) for k, v in sorted(cpu_by_role.items(), key=lambda kv: -kv[1])},
            "ray_init_s": t_init, "actors": t["actors"], "n_frames": report["n_frames"],
            "upstream": report["upstream"], "shard_bytes": sum(f.stat().st_size for f in shards),
            "ssl_column_bytes": ssl_bytes}


def _run_child(*args) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def storage_lines(pipe: dict, size: str) -> list[str]:
    """Bytes per hour of audio per kept layer: measured, and raw float16 for each width."""
    up = pipe["upstream"]
    hours, n_layers, width = pipe["audio_s"] / 3600, len(up["layers"]), up["hidden_size"]
    fps = pipe["n_frames"] / pipe["audio_s"]
    raw_used = FRAMES_PER_S * width * 2 * 3600
    stored_ssl = pipe["ssl_column_bytes"] / hours / n_layers
    stored_all = pipe["shard_bytes"] / hours / n_layers
    ratio = stored_ssl / (fps * width * 2 * 3600)
    lines = [f"storage per hour of audio per kept layer ({size}, hidden {width}, layers {up['layers']}, "
             f"{fps:.2f} frames/s measured):",
             f"  Parquet shards (zstd, all columns) {stored_all / MB:,.1f} MB; the ssl column alone "
             f"{stored_ssl / MB:,.1f} MB; raw float16 at {FRAMES_PER_S} frames/s {raw_used / MB:,.1f} MB "
             f"(ssl column / raw at the measured frame rate = {ratio:.3f})"]
    for name in ("base", "large"):
        w = WIDTHS[name]
        raw = FRAMES_PER_S * w * 2 * 3600
        lines.append(f"  {name} (hidden {w}): raw float16 {raw / MB:,.1f} MB per hour per layer "
                     f"({raw * 1000 / 1e12:,.2f} TB per 1,000 h per layer); at this run's ratio "
                     f"{ratio * raw * fps / FRAMES_PER_S / MB:,.1f} MB")
    lines.append(f"  (log-mel for comparison: 80 float32 at 100 frames/s = {80 * 4 * 100 * 3600 / MB:,.1f} MB "
                 "per hour raw)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "base"), default="tiny",
                   help="tiny: hidden 64, 4 layers; base: WavLM base's shape (768, 12 layers, FFN 3072)")
    p.add_argument("--norm", choices=("layer", "group"), default="layer",
                   help="the CNN's norm: layer (padded batches) or group (one utterance per pass)")
    p.add_argument("--layers", default=None,
                   help="features.ssl_layers, comma-separated (default: the middle and last layer)")
    p.add_argument("--unique", type=int, default=48, help="distinct synthesized utterances")
    p.add_argument("--utterances", type=int, default=192, help="manifest rows (the unique ones cycled)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the pipeline's Ray (one per actor)")
    p.add_argument("--loop-threads", type=int, default=1, help="torch threads of the loop (an actor has 1)")
    p.add_argument("--batch-seconds", type=float, default=60.0,
                   help="the pipeline's features.ssl_batch_seconds (0.01: one utterance per forward pass, "
                        "the default on a CPU when unset)")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode, alternated; the fastest counts")
    p.add_argument("--gpu", action="store_true", help="the encoder on CUDA in both modes (exit 2 without)")
    p.add_argument("--gpu-share", type=float, default=0.5, help="with --gpu: features.ssl_num_gpus per actor")
    p.add_argument("--workdir", default=None, help="keeps the corpus and the upstream (default: a temp dir)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, *rest = args.child
        print(json.dumps((_child_loop if mode == "loop" else _child_pipeline)(*rest)))
        return 0

    import torch

    if args.gpu and not torch.cuda.is_available():
        print("SKIPPED: --gpu needs a CUDA device and torch sees none here; without --gpu the same "
              "comparison runs on the CPU", flush=True)
        return 2
    if args.gpu and not 0 < args.gpu_share <= 1:
        p.error(f"--gpu-share={args.gpu_share}: a share of one GPU, in (0, 1]")
    n_layers = 4 if args.size == "tiny" else 12
    layers = args.layers or f"{n_layers // 2},{n_layers}"
    gpu_share = args.gpu_share if args.gpu else 0.0

    from ctal.corpora import read_corpus
    from ctal.corpora.synthetic import synthesize
    from ctal.tokenizer import train_bpe_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ctal-ssl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.unique}"
    if not (corpus / "synthetic_meta.csv").is_file():
        info = synthesize("librispeech", corpus, args.unique, seed=0)
        print(f"synthesized {args.unique} utterances ({info['audio_s']:.0f} s of audio) in {info['wall_s']:.0f} s")
    rows = read_corpus("librispeech", corpus)
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        train_bpe_tokenizer([r["text"] for r in rows], 30000, tok_dir)
    upstream = work / f"upstream-{args.size}-{args.norm}"
    if not (upstream / "config.json").is_file():
        save_upstream(args.size, args.norm, upstream)
    manifest = work / f"manifest-{args.unique}-{args.utterances}.csv"
    _write_manifest(rows, args.utterances, manifest)

    load_before = os.getloadavg()[0]
    best = {}
    for _ in range(args.repeats):  # alternate the modes; keep each one's fastest run
        for mode in ("loop", "pipeline"):
            out = work / f"{mode}-{time.time_ns()}"
            last = args.loop_threads if mode == "loop" else args.num_cpus
            r = _run_child(mode, manifest, out, upstream, layers, tok_dir, gpu_share, args.batch_seconds, last)
            shutil.rmtree(out, ignore_errors=True)
            if mode not in best or r["wall_s"] < best[mode]["wall_s"]:
                best[mode] = r
    load_after = os.getloadavg()[0]
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    loop, pipe = best["loop"], best["pipeline"]
    n = args.utterances
    if args.gpu:
        where = f"{torch.cuda.get_device_name(0)}, {loop['autocast']} autocast, ssl_num_gpus={gpu_share:g}"
    else:
        where = f"CPU, {args.num_cpus} cores"
    print(f"\nSSL extraction, WavLM {args.size} ({args.norm} norm), layers [{layers}], {where}; "
          f"{n} utterances ({loop['audio_s'] / 3600:.3f} h; {args.unique} distinct eSpeak, cycled)")
    print(f"{'mode':<9} {'utt/s':>7} {'x realtime':>10} {'wall s':>7} {'CPU ms/utt':>10}  notes")
    lr, pr = n / loop["wall_s"], n / pipe["wall_s"]
    print(f"{'loop':<9} {lr:>7.1f} {loop['audio_s'] / loop['wall_s']:>10.1f} {loop['wall_s']:>7.1f} "
          f"{1e3 * loop['cpu_s'] / n:>10.1f}  {args.loop_threads} torch thread(s) on {loop['device']}; model load "
          f"{loop['load_s']:.1f} s; encoder {100 * loop['encoder_s'] / loop['wall_s']:.0f} % of the wall")
    print(f"{'pipeline':<9} {pr:>7.1f} {pipe['audio_s'] / pipe['wall_s']:>10.1f} {pipe['wall_s']:>7.1f} "
          f"{1e3 * pipe['featurize_cpu_s'] / n:>10.1f}  {pipe['actors']} actors, ssl_batch_seconds="
          f"{args.batch_seconds:g}; ray.init {pipe['ray_init_s']:.1f} s (not counted)")
    print(f"ratio pipeline / loop: {pr / lr:.2f}x (projected from CPU, {args.num_cpus} x loop CPU / pipeline "
          f"CPU: {args.num_cpus * loop['cpu_s'] / pipe['featurize_cpu_s']:.2f}x)")
    if loop["written"] != pipe["written"]:
        print(f"WARNING: the loop wrote {loop['written']} utterances, the pipeline {pipe['written']}")
    print("\n".join(storage_lines(pipe, args.size)))
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores "
          "(other processes on the machine distort both rates)")
    print(json.dumps({"size": args.size, "norm": args.norm, "layers": layers, "gpu": args.gpu,
                      "batch_seconds": args.batch_seconds,
                      "loop": loop, "pipeline": pipe}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
