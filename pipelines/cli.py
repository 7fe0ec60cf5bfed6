"""`ctal COMMAND [arguments]`: the recipes of pipelines/ as one console command.

    ctal demo --quick                       # = python pipelines/demo.py --quick in a checkout
    ctal pretrain --data DIR --size narrow max_steps=40
    ctal COMMAND --help                     # that recipe's own arguments

Installed (`pip install .`), pipelines/ is the package ctal_pipelines and this is its `ctal` console
script; each command passes its arguments unchanged to the recipe's `main`.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

# command → recipe module of this package; adding a recipe is one line here.
COMMANDS = {
    "synthesize": "synthesize",
    "preprocess": "preprocess",
    "pretrain": "pretrain",
    "tune": "tune_finetune",
    "evaluate": "evaluate",
    "embed": "embed",
    "demo": "demo",
    "ablate": "ablate",
    "convert-release": "convert_release",
}


def summary(module: str) -> str:
    """The first line of a recipe's docstring, read from its source: importing it for --help would
    load torch and Ray."""
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.split("\n", 1)[0]


def parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items())
    p = argparse.ArgumentParser(prog="ctal", description=__doc__.split("\n\n")[0],
                                epilog=f"commands:\n{listing}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="the recipe's arguments (ctal COMMAND --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not argv:  # argparse would ask for "COMMAND, arguments", as if both were needed
        p.print_help(sys.stderr)
        p.exit(2, "ctal: error: give a COMMAND\n")
    args = p.parse_args(argv)
    from ctal.manifest import record_command

    record_command(["ctal", args.command, *args.arguments])  # manifests and model cards show this line
    sys.argv[0] = f"ctal {args.command}"  # the recipe's usage and error lines name the command
    recipe = importlib.import_module(f"{__package__}.{COMMANDS[args.command]}")
    code = recipe.main(args.arguments)
    return code if isinstance(code, int) else 0  # synthesize returns its summary


if __name__ == "__main__":
    sys.exit(main())
