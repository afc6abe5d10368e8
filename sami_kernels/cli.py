"""`sami-kernels <command>` (also `python -m sami_kernels <command>`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sami-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="score built-in queries with the embedded SmolLM2-135M and print M and the loss")
    commands.add_parser("env", help="versions and kernel backends available here (paste into bug reports)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as run
    else:
        from .env import main as run
    run()
