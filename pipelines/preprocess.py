"""Corpus → Parquet features (+ quarantine.parquet, report.json, tokenizer/) with Ray Data.

    python pipelines/preprocess.py --corpus librispeech --root DIR --out DIR [--overwrite]
        [--config configs/preprocess.yaml] [--num-cpus N] [key=value ...]

``key=value`` overrides DataConfig (e.g. ``max_duration_s=20 tokenizer=/path/to/hf_tokenizer``).
Bad config keys or values, a wrong layout, an existing output and one another run is writing all
fail before Ray starts (exit code 2).
"""
from __future__ import annotations

import argparse
import sys

from ctal import storage
from ctal.config import ConfigError, DataConfig, load_config
from ctal.console import VERBOSE_HELP, error_line, set_verbose, stage
from ctal.corpora import READERS, read_corpus
from ctal.distributed.preprocess import run_preprocess
from ctal.outputs import claim_output
from ctal.preprocess import NothingToPublishError, check_inputs, check_output, resolve_upstream


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, choices=sorted(READERS))
    p.add_argument("--root", required=True,
                   help="corpus root in that corpus's layout (csv: the manifest); a local path or file:// "
                        "(on a cluster: the same path on every node)")
    p.add_argument("--out", required=True,
                   help="output data set: a directory or a URI (s3://bucket/prefix, gs://, file://)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output data set")
    p.add_argument("--config", action="append", default=[], help="DataConfig YAML (repeatable)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for featurization (default: all)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    set_verbose(args.verbose)

    try:
        data_cfg = load_config(DataConfig, args.config, args.overrides)
        check_output(args.out, args.overwrite)
        root = str(storage.local_path(args.root, "--root"))  # file:// → its path; s3:// etc. refused
        rows = read_corpus(args.corpus, root)
        check_inputs(rows, args.corpus, root, data_cfg, args.num_cpus)
        resolve_upstream(data_cfg)  # an SSL front end's folder and layers, before Ray
        claim = claim_output(args.out)  # last: refused runs leave no claim behind
    except (ConfigError, FileExistsError, ValueError, OSError) as e:  # CorpusLayoutError is a ValueError
        p.exit(2, error_line(p.prog, e))

    from ctal.distributed.console import init_ray

    fc = data_cfg.features
    frames = {"ssl": f"{fc.ssl_model}'s hidden states", "waveform": f"{fc.sample_rate} Hz int16 waveforms"}.get(
        fc.frontend, "log-Mel features")
    stage("preprocess", f"{len(rows)} {args.corpus} utterances from {root} → {frames} and "
          f"token ids in {args.out} (Parquet, with Ray Data)")
    init_ray()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    try:
        run_preprocess(args.corpus, root, args.out, data_cfg, overwrite=args.overwrite,
                       num_cpus=args.num_cpus, rows=rows, claim=claim)
    except NothingToPublishError as e:
        p.exit(1, error_line(p.prog, e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
