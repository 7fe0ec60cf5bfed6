"""Fused CTAL embeddings for an audio+text manifest.

    python pipelines/embed.py --checkpoint DIR --manifest FILE.csv --out FILE.parquet [--streams]

The manifest is the generic CSV/TSV one (audio_path, text, optional id/speaker/label/split). Audio and
text go through the preprocessing the checkpoint's training data did (recorded with it). A pretraining
checkpoint is refused: only fine-tuning trains the fusion head that gives the embedding. Bad rows
(e.g. a text longer than the model's positions: text_too_long) are listed (and written to
FILE.bad.csv) but do not stop the run. --streams adds the mean final state of each stream the
checkpoint's fusion variant runs, on its own path (text_vector unless audio_only; audio_vector
unless text_only, without cross-attention for late_concat and audio_only). FILE.manifest.json
records the run (code, versions, command, machine, times).
"""
import argparse
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from ctal.checkpoint import CheckpointError, record_command
from ctal.corpora import CorpusLayoutError, read_manifest
from ctal.embed import embed_rows, load_for_embedding
from ctal.manifest import recorded_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="fine-tuned CTAL checkpoint directory")
    p.add_argument("--manifest", required=True, help="CSV/TSV with audio_path and text columns")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one saved with the checkpoint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ssl-model", help="SSL features: the upstream folder, where the one the checkpoint "
                                       "records is not on this machine (it must hash the same)")
    p.add_argument("--streams", action="store_true",
                   help="also write the mean final state of each stream the fusion variant runs")
    args = p.parse_args(argv)
    record_command()
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give the Parquet file to write, e.g. "
                             f"{Path(args.out) / 'embeddings.parquet'}")
        rows = read_manifest(args.manifest)
        model, tokenizer, data_cfg = load_for_embedding(args.checkpoint, args.tokenizer, args.ssl_model)
    except (FileNotFoundError, ValueError, CorpusLayoutError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    with recorded_run(out.parent, "embed", vars(args), file=f"{out.stem}.manifest.json"):
        table, bad = embed_rows(model, rows, tokenizer, data_cfg=data_cfg, batch_size=args.batch_size,
                                device=args.device, max_frames=model.config.max_audio_positions, streams=args.streams)
        pq.write_table(table, out, compression="zstd")
    print(f"wrote {table.num_rows} embeddings (dim {model.fusion.dense.out_features}) to {args.out}")
    if bad:
        bad_path = Path(args.out).with_suffix(".bad.csv")
        pd.DataFrame(bad).to_csv(bad_path, index=False)
        print(f"{len(bad)} bad rows (listed in {bad_path}):")
        for b in bad:
            print(f"  {b['id']}: {b['reason']} ({b['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
