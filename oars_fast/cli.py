"""`oars-fast <command> --config FILE [key=value ...]`: parse, then dispatch to a stage.

The CLI only parses and dispatches; each command's work lives in `oars_fast.stages`.
`oars-fast <command> --help` lists that command's config fields with defaults and docs. A user's
mistake (:class:`~oars_fast.errors.OarsError`: a config error, a missing file, a missing device, a
diverged run) ends as one line on stderr and its exit code; anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

import yaml

from .config import (
    AnnotateJob,
    CompassSFTJob,
    DataJob,
    DemoBaseJob,
    EvalJob,
    EvalPairsJob,
    InferJob,
    MergeJob,
    PipelineJob,
    ReportJob,
    RLJob,
    SFTJob,
    describe,
    load_config,
    to_dict,
)
from .config.pipeline import split_overrides
from .errors import OarsError
from .runtime.distributed import launched_world


@dataclass(frozen=True)
class Command:
    help: str
    job: type | None  # the config dataclass; None: no config
    runner: str | None  # "module:function" taking the loaded job; None: not built yet
    missing: str = ""  # for commands not built yet: what is missing


COMMANDS: dict[str, Command] = {
    "data": Command("prepare the data set of a config and report what it holds", DataJob,
                    "oars_fast.stages.data:run"),
    "demo-base": Command("demo only: pretrain the tiny model (VAE + generic bicubic SR) as a stand-in base",
                         DemoBaseJob, "oars_fast.stages.demo_base:run"),
    "sft": Command("cold-start flow-matching SFT (LR -> HR)", SFTJob, "oars_fast.stages.sft:run"),
    "infer": Command("super-resolve a file or folder of LR images", InferJob, "oars_fast.stages.infer:run"),
    "rl": Command("online RL of a LoRA on the base (rl.mode=fr|nr, rl.objective=nft|flow_grpo)", RLJob,
                  "oars_fast.stages.rl:run"),
    "merge": Command("merge a LoRA delta (OARS: the RL LoRA) into a model's weights (OARS: the SFT model)",
                     MergeJob, "oars_fast.stages.merge:run"),
    "annotate": Command("COMPASS annotation: anchors, pairwise ranking, calibration -> manifest", AnnotateJob,
                        "oars_fast.stages.annotate:run"),
    "compass-sft": Command("train the COMPASS reward model on an annotation manifest", CompassSFTJob,
                           "oars_fast.stages.compass_sft:run"),
    "eval-pairs": Command("pairwise accuracy of a quality scorer (COMPASS, DISTS, ...) on groups with preferences",
                          EvalPairsJob, "oars_fast.stages.eval_pairs:run"),
    "eval": Command("SR models side by side (bicubic, model folders, SR folders) on a folder pair or a benchmark: "
                    "PSNR/SSIM-Y, PSNR-RGB, LR consistency, DISTS, COMPASS, NR-IQA -> <run>/eval/", EvalJob,
                    "oars_fast.stages.eval:run"),
    "report": Command("report.html + report.png of a run: eval table, LR | models | HR grids with zooms, training "
                      "curves, perception-fidelity plot", ReportJob, "oars_fast.stages.report:run"),
    "pipeline": Command("every stage in order (demo: data, base, sft, annotation, COMPASS, FR-RL, NR-RL + merge, "
                        "eval, report), resumable; key=value overrides for run.*/pipeline.* or any stage's section",
                        PipelineJob, "oars_fast.stages.pipeline:run"),
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
        sp.add_argument("--config", help="YAML config file (a path, or a shipped one: configs/demo/sft.yaml)")
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
    try:
        if cmd.job is None:
            target = args.overrides
        else:
            overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
            own = extra = None
            if cmd.job is PipelineJob:  # the pipeline's own keys; the rest go to its stages
                own, extra = split_overrides(overrides)
                overrides = own
            target = load_config(cmd.job, args.config, overrides, world=launched_world())
            if args.print_config:
                print(yaml.safe_dump(to_dict(target), sort_keys=False))
                return 0
        module, func = cmd.runner.split(":")
        fn = getattr(importlib.import_module(module), func)
        if cmd.job is PipelineJob:
            return int(fn(target, extra, own, args.config) or 0)
        return int(fn(target) or 0)
    except OarsError as e:
        print(f"oars-fast {args.command}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
