"""`oars-fast <command> --config FILE [key=value ...]`: parse, then dispatch to a stage.

The CLI only parses and dispatches; each command's work lives in `oars_fast.stages`.
`oars-fast <command> --help` lists that command's config fields with defaults and docs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from .config import BaseJob, ConfigError, DataJob, InferJob, MergeJob, RLJob, SFTJob, describe, load_config


@dataclass(frozen=True)
class Command:
    help: str
    job: type | None  # the config dataclass; None: no config
    runner: str | None  # "module:function" taking the loaded job; None: not built yet
    missing: str = ""  # for commands not built yet: what is missing


COMMANDS: dict[str, Command] = {
    "data": Command("prepare the data set of a config and report what it holds", DataJob,
                    "oars_fast.stages.data:run"),
    "base": Command("demo only: pretrain the tiny model (VAE + generic bicubic SR) as a stand-in base", BaseJob,
                    "oars_fast.stages.base:run"),
    "sft": Command("cold-start flow-matching SFT (LR -> HR)", SFTJob, "oars_fast.stages.sft:run"),
    "infer": Command("super-resolve a file or folder of LR images", InferJob, "oars_fast.stages.infer:run"),
    "rl": Command("online RL of a LoRA on the base (rl.mode=fr|nr, rl.objective=nft|flow_grpo)", RLJob,
                  "oars_fast.stages.rl:run"),
    "merge": Command("merge a LoRA delta (OARS: the RL LoRA) into a model's weights (OARS: the SFT model)",
                     MergeJob, "oars_fast.stages.merge:run"),
    "compass-sft": Command("train the COMPASS reward model", None, None, "the COMPASS reward model"),
    "eval": Command("PSNR / SSIM / DISTS of SR outputs against ground truth", None, None, "the eval stage"),
    "pipeline": Command("every stage in order, with its report", None, None, "the end-to-end pipeline"),
    "demo": Command("the whole pipeline on tiny models and bundled photos, on the CPU", None,
                    "oars_fast.stages.demo:run"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oars-fast",
        description="OARS: online RL alignment of 4x real-world super-resolution.",
        epilog="Run `oars-fast <command> --help` for that command's config fields.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # the deepspeed launcher passes --local_rank=N before the command (torchrun sets LOCAL_RANK instead)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in COMMANDS.items():
        status = "" if cmd.runner else "  [not built yet]"
        fields = "\n".join(describe(cmd.job)) if cmd.job else "(no config)"
        sp = sub.add_parser(name, help=cmd.help + status, description=cmd.help + status,
                            epilog="config fields (set in the YAML file or as key=value):\n" + fields,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", help="YAML config file (see configs/)")
        sp.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sp.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 2
    cmd = COMMANDS[args.command]
    if cmd.runner is None:
        print(f"oars-fast {args.command}: not built yet: {cmd.missing} has not landed.", file=sys.stderr)
        return 2
    job = None
    if cmd.job is not None:
        overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
        try:
            job = load_config(cmd.job, args.config, overrides)
        except ConfigError as e:
            print(f"oars-fast {args.command}: config error: {e}", file=sys.stderr)
            return 2
        if args.print_config:
            import yaml

            from .config import to_dict

            print(yaml.safe_dump(to_dict(job), sort_keys=False))
            return 0
    module, func = cmd.runner.split(":")
    result = getattr(importlib.import_module(module), func)(job) if job is not None else \
        getattr(importlib.import_module(module), func)(args.overrides)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
