"""The authors' released CTAL checkpoint → a ctal-ray pretraining checkpoint for fine-tuning.

    python pipelines/convert_release.py --checkpoint CTAL-Base.ckpt \\
        --tokenizer CTAL_EMNLP2021/tokenizer/libri-roberta_train-960 --out runs/ctal-base-release

--checkpoint: CTAL-Base or CTAL-Large as the authors publish it, or a states-*.ckpt their training
code wrote (download it yourself: nothing is downloaded here); it is read with
torch.load(weights_only=True): argparse.Namespace and the release's optimizer classes (read as inert
records, never imported) are allowed, any other global is refused by name. Its Optimizer entry is
dropped (docs/release.md). --tokenizer: the byte-level BPE it was trained with (vocab.json +
merges.txt, from the release's repository), or a ctal-ray tokenizer folder. --audio-causal: whether
the weights were trained with causal audio self-attention (default: the file's is_decoder; the
authors' later *_correct checkpoints are bidirectional with the same config). --overwrite replaces
an earlier conversion, never another directory or a file. The weights were trained on the
release's own audio features, so the task data must be preprocessed with features.frontend=release
and this checkpoint's tokenizer; fine-tuning refuses data that is not. Bad input exits with code 2
and writes nothing.
"""
from __future__ import annotations

import argparse
import sys

from ctal.checkpoint import record_command
from ctal.console import error_line
from ctal.release import ReleaseFormatError, convert_release


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the authors' release checkpoint file (torch.save)")
    p.add_argument("--tokenizer", required=True,
                   help="its tokenizer: a vocab.json + merges.txt folder or a ctal-ray tokenizer folder")
    p.add_argument("--out", required=True, help="output checkpoint directory (a path or URI)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out")
    p.add_argument("--audio-causal", choices=("true", "false"), default=None,
                   help="causal audio self-attention (default: the file's is_decoder)")
    args = p.parse_args(argv)
    record_command()  # for the model card
    causal = None if args.audio_causal is None else args.audio_causal == "true"
    try:
        out = convert_release(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite,
                              audio_causal=causal)
    except (ReleaseFormatError, ValueError, OSError) as e:  # FileNotFoundError, FileExistsError
        p.exit(2, error_line(p.prog, e))
    print(f"wrote {out}: a pretraining checkpoint on features.frontend=release frames.\n"
          "Preprocess the task data for it, then fine-tune:\n"
          f"  python pipelines/preprocess.py --corpus CORPUS --root ROOT --out DATA tokenizer={out} "
          "features.frontend=release\n"
          f"  python pipelines/tune_finetune.py --task TASK --data DATA --init {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
