"""`sami-kernels <command>` (also `python -m sami_kernels <command>`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sami-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="score built-in queries with the embedded SmolLM2-135M and print M and the loss")
    commands.add_parser("env", help="versions and kernel backends available here (paste into bug reports)")
    sami = commands.add_parser("sami", help="run the SAMI training loop from a YAML config (resumes if interrupted)")
    sami.add_argument("--config", required=True, help="YAML config, e.g. examples/configs/sami_demo.yaml")
    sami.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    align = commands.add_parser("self-align", help="run SELF-ALIGN's stages from a YAML config (resumable)")
    align.add_argument("--config", required=True, help="YAML config, e.g. examples/configs/self_align_demo.yaml")
    align.add_argument("--stage", default="all", choices=["all", "1", "2", "3", "4", "eval"])
    align.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan = commands.add_parser("plan", help="per-rank GPU memory of a SAMI / SELF-ALIGN config (DDP vs FSDP2, ...)")
    plan.add_argument("--config", required=True, help="a SAMI or SELF-ALIGN YAML config")
    plan.add_argument("--world-size", type=int, default=1, help="processes (GPUs) the run shards over")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (80 for an 80 GB card)")
    plan.add_argument("--prompt-tokens", type=int, help="SAMI prompt length P (default 512)")
    plan.add_argument("--response-tokens", type=int, help="SAMI response length R (default generation.max_new_tokens)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo()
    elif args.command == "env":
        from .env import main as run_env

        run_env()
    else:
        from ..recipes.checkpoint import CheckpointError
        from ..recipes.config import load_config

        try:  # a bad config or input, or a refused checkpoint: said plainly, without a traceback
            if args.command == "plan":
                from ..recipes.plan import run_plan

                print(
                    run_plan(
                        args.config,
                        args.set,
                        world_size=args.world_size,
                        gpu_memory_gb=args.gpu_memory_gb,
                        prompt_tokens=args.prompt_tokens,
                        response_tokens=args.response_tokens,
                    )
                )
            elif args.command == "sami":
                from ..recipes.sami.config import SAMIConfig
                from ..recipes.sami.loop import print_summary, run_sami

                print_summary(run_sami(load_config(SAMIConfig, args.config, args.set)))
            else:
                from ..recipes.self_align.config import SelfAlignConfig
                from ..recipes.self_align.loop import print_report, run_self_align

                print_report(run_self_align(load_config(SelfAlignConfig, args.config, args.set), args.stage))
        except (ValueError, CheckpointError) as error:
            sys.exit(f"sami-kernels {args.command}: {error}")
