"""Write a synthetic eSpeak NG corpus in a real corpus's on-disk layout.

    python pipelines/synthesize.py --layout mosei --out data/synth_mosei --utterances 200 --seed 0

See ctal/corpora/synthetic.py for what carries each label. Input errors (counts below 1, an --out that
is a file or a non-empty directory) are one line on stderr and exit code 2.
"""

import argparse
import json

from ctal.console import VERBOSE_HELP, error_line, set_verbose, stage
from ctal.corpora.synthetic import LAYOUTS, synthesize


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--out", required=True, help="output directory (empty, or a synthetic corpus with --overwrite)")
    p.add_argument("--utterances", type=int, default=200, help="how many (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="synthesis processes, at least 1 (default: CPUs, at most 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic corpus in --out")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    if args.utterances < 1:
        p.error(f"--utterances must be at least 1, got {args.utterances}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    stage("synthesize", f"{args.utterances} {args.layout}-layout utterances with eSpeak NG → {args.out}")
    try:
        summary = synthesize(args.layout, args.out, args.utterances, args.seed, overwrite=args.overwrite,
                             workers=args.workers)
    except (ValueError, FileExistsError, NotADirectoryError, PermissionError) as e:
        p.exit(2, error_line(p.prog, e))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
