"""`oars-fast pipeline`: every stage of OARS in order, handing over through named folders, resumable.

    oars-fast pipeline --config configs/demo/pipeline.yaml      # make demo: tiny models, bundled photos, CPU

Stages (``pipeline.stages``), each reading ``<pipeline.configs>/<stage>.yaml`` and writing ``runs/<name>/<stage>/``:

1. ``data``      the data set and a preview;
2. ``base``      demo only: the stand-in for a pretrained base (tiny VAE + generic bicubic-SR pre-training);
                 with ``pipeline.base_model`` (production: Qwen/Qwen-Image-Edit-2509) there is none;
3. ``sft``       cold-start SFT of the base -> ``sft/model``;
4. ``methods``   demo only: the annotation set, ``methods/{lr,gt,sr/<method>}``: training patches degraded to LR
                 and super-resolved by several methods (bicubic, the base, an early SFT checkpoint, the SFT model at
                 several sampler step counts, degraded copies of the ground truth, and sharp but unfaithful edits
                 of it: shifted by a few pixels, colour- or brightness-shifted, which give COMPASS's fidelity head
                 examples of high quality with low fidelity);
5. ``annotate``  the COMPASS three-stage annotation -> ``annotate/manifest.jsonl``;
6. ``compass``   COMPASS training -> ``compass/model``;
7. ``rl_fr``     full-reference RL of a LoRA on the base -> ``rl_fr/lora`` (+ merged into the SFT model);
8. ``rl_nr``     no-reference RL on COMPASS, continuing that LoRA -> ``rl_nr/lora``, merged into the SFT model:
                 ``rl_nr/merged``, the OARS model;
9. ``eval``      bicubic, SFT, FR-RL and OARS side by side on the held-out patches, and SFT and OARS back-projected
                 onto their LR (``SFT+BP``, ``OARS+BP``; an inference option, not OARS), and the ground truth
                 itself (``HR``: the LR consistency and COMPASS R of a perfect restoration) -> ``eval/metrics.json``;
10. ``report``   ``report.html`` + ``report.png``.

A stage that finished writes ``<stage>/DONE.json`` (wall time, summary) and is skipped by a re-run
(``pipeline.redo`` runs it again); an interrupted one is run again with ``run.resume=true`` (training stages
continue from their newest complete checkpoint; the annotation from its score cache; eval from its cached outputs).
The terminal shows one overall progress bar with each stage's bar beneath it and at most one log line every
``run.log_interval`` seconds per stage (every step still goes to the stage's log files); the wall time of every
stage is printed at the end.

Production stages run on 8 GPUs, each under the deepspeed launcher (one command per stage; the pipeline prints
them with ``pipeline.configs=qwen_image_edit``), since one process group cannot be re-created for every stage.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from ..config import (
    AnnotateJob,
    CompassSFTJob,
    DataJob,
    DemoBaseJob,
    EvalJob,
    ReportJob,
    RLJob,
    SFTJob,
    load_config,
    save_config,
)
from ..config.pipeline import PipelineJob
from ..config.schema import resolve_config_path, shipped_config
from ..data.build import build_dataset
from ..data.degrade import Degrader
from ..data.heldout import centre_crop, held_out
from ..data.images import load_image, save_image
from ..errors import UserError
from ..models.backbone import load_backbone
from ..models.sampler import sample_sr
from ..runtime.seeding import derive_seeds

log = logging.getLogger(__name__)

METHOD_SEED = 31  # derive_seeds tag of the annotation set's LR degradation
DONE = "DONE.json"


@dataclass(frozen=True)
class Stage:
    name: str
    job: type | None  # the stage's job (None: the pipeline's own step)
    module: str | None  # the stage module whose run(job) runs it
    config: str  # <configs>/<config>.yaml


STAGES = {s.name: s for s in [
    Stage("data", DataJob, "oars_fast.stages.data", "data"),
    Stage("base", DemoBaseJob, "oars_fast.stages.demo_base", "base"),
    Stage("sft", SFTJob, "oars_fast.stages.sft", "sft"),
    Stage("methods", None, None, "sft"),
    Stage("annotate", AnnotateJob, "oars_fast.stages.annotate", "annotate"),
    Stage("compass", CompassSFTJob, "oars_fast.stages.compass_sft", "compass"),
    Stage("rl_fr", RLJob, "oars_fast.stages.rl", "rl_fr"),
    Stage("rl_nr", RLJob, "oars_fast.stages.rl", "rl_nr"),
    Stage("eval", EvalJob, "oars_fast.stages.eval", "eval"),
    Stage("report", ReportJob, "oars_fast.stages.report", "report"),
]}
RESUMABLE = {"base", "sft", "compass", "rl_fr", "rl_nr"}
DISTRIBUTED = {"sft", "compass", "rl_fr", "rl_nr"}  # production: launched by deepspeed on every GPU of a node


class Pipeline:
    def __init__(self, job: PipelineJob, cli_overrides: list[str], own_overrides: list[str] | None = None):
        self.job, self.cfg = job, job.pipeline
        self.own_overrides = own_overrides or []  # the pipeline's own (run.*, pipeline.*), for print_commands
        self.root = job.run.run_dir
        self.cli_overrides = cli_overrides
        folder = Path(self.cfg.configs)
        self.configs = folder if folder.is_dir() else shipped_config(self.cfg.configs)
        if not self.configs.is_dir():
            raise UserError(f"pipeline.configs={self.cfg.configs}: neither a folder nor a shipped config set "
                            f"(demo, qwen_image_edit)")

    # -- paths handed over between stages ------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def base(self) -> str:
        return self.cfg.base_model or str(self.path("base", "model"))

    @property
    def demo(self) -> bool:
        """The demo: a stand-in base built here, its own annotation set and held-out patches. In production the
        annotation inputs and the evaluation benchmark come from the stage configs (annotate.*, eval.*)."""
        return self.cfg.base_model is None

    def wiring(self, name: str) -> list[str]:
        """The overrides that hand the previous stages' outputs to stage `name`."""
        p, sft = self.path, str(self.path("sft", "model"))
        annotation_set = [f"annotate.lr_dir={p('methods', 'lr')}", f"annotate.sr_root={p('methods', 'sr')}",
                          f"annotate.gt_dir={p('methods', 'gt')}"] if self.demo else []
        heldout = [f"eval.lr_dir={p('heldout', 'lr')}", f"eval.hr_dir={p('heldout', 'hr')}"] if self.demo else []
        return {
            "sft": [f"model.pretrained={self.base}"],
            "annotate": [*annotation_set, f"annotate.output={p('annotate')}"],
            "compass": [f"compass.manifest={p('annotate', 'manifest.jsonl')}"],
            "rl_fr": [f"model.pretrained={self.base}", f"rl.sft_model={sft}"],
            "rl_nr": [f"model.pretrained={self.base}", f"rl.sft_model={sft}", f"rl.init_lora={p('rl_fr', 'lora')}",
                      f"reward.compass={p('compass', 'model')}"],
            "eval": [*heldout, f"eval.compass={p('compass', 'model')}",
                     "eval.models=" + json.dumps([{"bicubic": "bicubic"}, {"SFT": sft},
                                                  {"FR-RL": str(p("rl_fr", "merged"))},
                                                  {"OARS": str(p("rl_nr", "merged"))},
                                                  {"SFT+BP": "bp:SFT"}, {"OARS+BP": "bp:OARS"},
                                                  {"HR": "hr"}])],
            "report": [f"report.run_root={self.root}", "report.models=[bicubic, SFT, FR-RL, OARS, OARS+BP]"],
        }.get(name, [])

    def stage_job(self, stage: Stage, resume: bool):
        """The stage's job: its YAML, the pipeline's run folder and wiring, then the user's overrides."""
        yaml_path = resolve_config_path(self.configs / f"{stage.config}.yaml")
        sections = {f.name for f in dataclasses.fields(stage.job)}
        mine = [o.split(":", 1)[1] for o in self.cfg.overrides if o.split(":", 1)[0] == stage.name]
        shared = [o for o in self.cli_overrides if o.split("=", 1)[0].split(".")[0] in sections
                  and not o.startswith(("run.name=", "run.output_dir="))]
        # eval and report write into the run folder itself (<run>/eval/, <run>/report.html); the rest <run>/<stage>/
        where = (self.root.parent, self.root.name) if stage.name in ("eval", "report") else (self.root, stage.name)
        run = [f"run.output_dir={where[0]}", f"run.name={where[1]}"] + (["run.resume=true"] if resume else [])
        return load_config(stage.job, yaml_path, [*run, *self.wiring(stage.name), *shared, *mine])

    # -- running -------------------------------------------------------------------------------------
    def commands(self, config: str) -> list[str]:
        """One launch line per unfinished stage: this pipeline restricted to that stage, the training stages under
        the deepspeed launcher on `pipeline.gpus` GPUs, the others as one process."""
        lines = []
        for name in self.cfg.stages:
            if self.path(name, DONE).is_file() and name not in self.cfg.redo:
                continue
            launch = (f"deepspeed --num_gpus {self.cfg.gpus} --module" if name in DISTRIBUTED else "python -m")
            given = dict.fromkeys(self.own_overrides + self.cli_overrides)  # in order, once (run.* is in both)
            extra = " ".join(shlex.quote(o) for o in given
                             if not o.startswith(("pipeline.stages=", "pipeline.print_commands=")))
            lines.append(f"{launch} oars_fast.cli pipeline --config {shlex.quote(config)} "
                         f"'pipeline.stages=[{name}]' {extra}".rstrip())
        return lines

    def run(self) -> list[tuple[str, str, float]]:
        main = int(os.environ.get("RANK", "0")) == 0  # under the launcher: rank 0 alone writes the run's markers
        self.root.mkdir(parents=True, exist_ok=True)
        if main:
            save_config(self.job, self.root / "pipeline.yaml")
        rows = []
        bar = tqdm(self.cfg.stages, desc="pipeline", disable=None, position=0)
        for i, name in enumerate(bar):
            bar.set_postfix_str(name)
            done = self.path(name, DONE)
            if done.is_file() and name not in self.cfg.redo:
                rows.append((name, "done before", json.loads(done.read_text()).get("seconds", 0.0)))
                log.info("== %d/%d %s: complete, skipped", i + 1, len(self.cfg.stages), name)
                continue
            if name in self.cfg.redo:  # from scratch: nothing of an earlier run of the stage is reused
                shutil.rmtree(self.path(name), ignore_errors=True)
            resume = self.path(name).is_dir() and name in RESUMABLE
            log.info("== %d/%d %s%s", i + 1, len(self.cfg.stages), name, " (resuming)" if resume else "")
            t0 = time.perf_counter()
            self.run_stage(STAGES[name], resume)
            seconds = time.perf_counter() - t0
            if main:
                self.path(name).mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps({"seconds": round(seconds, 1),
                                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
            rows.append((name, "ran", seconds))
        bar.close()
        return rows

    def run_stage(self, stage: Stage, resume: bool) -> None:
        if stage.name == "methods":
            self.make_annotation_set()
            return
        if stage.name == "eval" and self.demo:
            self.write_heldout()
        job = self.stage_job(stage, resume)
        rc = importlib.import_module(stage.module).run(job)
        if rc:
            raise UserError(f"pipeline: stage {stage.name} ended with exit code {rc}")

    # -- the pipeline's own steps ----------------------------------------------------------------------
    def _sft_job(self) -> SFTJob:
        return self.stage_job(STAGES["sft"], resume=False)

    def write_heldout(self) -> None:
        """The held-out LR/HR patches every model is evaluated on -> heldout/{lr,hr}/ (the stages' own held-out
        set: the demo's val patches, degraded with the held-out seeds)."""
        job = self._sft_job()
        ho = held_out(job.data, build_dataset(job.data, job.run.seed), Degrader(job.degradation, job.data.scale),
                      self.cfg.heldout or None)
        for n, lr, hr in zip(ho.names, ho.lr, ho.hr):
            save_image(lr, self.path("heldout", "lr", f"{n}.png"))
            save_image(hr, self.path("heldout", "hr", f"{n}.png"))

    @torch.no_grad()
    def make_annotation_set(self) -> None:
        """Demo: `method_groups` training patches (centre crops), their LR, and the SR of every method."""
        job = self._sft_job()
        data = job.data
        files = build_dataset(data, job.run.seed).files[: self.cfg.method_groups]
        c = data.crop_size
        hr = torch.stack([centre_crop(load_image(f), c) for f in files])
        names = [Path(f).stem for f in files]
        lr = Degrader(job.degradation, data.scale)(hr, seeds=derive_seeds(range(len(files)), METHOD_SEED))
        out = self.path("methods")
        for n, a, b in zip(names, lr, hr):
            save_image(a, out / "lr" / f"{n}.png")
            save_image(b, out / "gt" / f"{n}.png")
        seeds = list(range(len(files)))
        models = {}
        for method in tqdm(self.cfg.methods, desc="methods", disable=None, leave=False):
            if method == "bicubic":
                sr = F.interpolate(lr, scale_factor=data.scale, mode="bicubic", align_corners=False).clamp(0, 1)
            elif method.startswith(GT_EDITS):
                sr = ground_truth_edit(hr, method)
            elif method in ("base", "sft_early") or method.startswith("sft_"):
                folder = self.base if method in ("base", "sft_early") else str(self.path("sft", "model"))
                key = (folder, method == "sft_early")
                if key not in models:
                    models[key] = self._model(folder, early=method == "sft_early")
                steps = int(method[4:-5]) if method.endswith("steps") else job.sampler.steps
                sr = sample_sr(models[key], lr, job.sampler, seeds=seeds, steps=steps)
            else:
                raise UserError(f"pipeline.methods: unknown method {method!r} (bicubic, base, sft_early, "
                                f"sft_<N>steps, blur<sigma>, noise<std>, shift<px>, color<gain>, bright<offset>)")
            for n, s in zip(names, sr):
                save_image(s, out / "sr" / method / f"{n}.png")
        log.info("annotation set: %d groups x %d methods in %s", len(files), len(self.cfg.methods), out)

    def _model(self, folder: str, early: bool):
        model = load_backbone(dataclasses.replace(self._sft_job().model, pretrained=folder), device="cpu").eval()
        if early:  # the SFT run's oldest kept checkpoint with consolidated weights, on the base it started from
            ckpts = sorted(self.path("sft", "checkpoints").glob("step_*/trainable.safetensors"))
            if not ckpts:
                raise UserError("pipeline.methods=sft_early needs a checkpoint of the sft stage with its consolidated "
                                "weights (sft.save_every; under DeepSpeed also deepspeed.consolidate_every)")
            model.transformer.load_state_dict(load_file(str(ckpts[0])), strict=False)
        return model


GT_EDITS = ("blur", "noise", "shift", "color", "bright")  # the annotation-set methods that edit the ground truth


def ground_truth_edit(hr: torch.Tensor, method: str) -> torch.Tensor:
    """An annotation-set method made from the ground truth (B, 3, H, W): ``blur<sigma>`` (Gaussian), ``noise<std>``
    (Gaussian, seeded), or one of the sharp fidelity negatives of :func:`unfaithful_edit`."""
    if method.startswith("blur"):
        return _blur(hr, float(method[4:]))
    if method.startswith("noise"):
        g = torch.Generator().manual_seed(METHOD_SEED)
        return (hr + float(method[5:]) * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    return unfaithful_edit(hr, method)


def unfaithful_edit(hr: torch.Tensor, method: str) -> torch.Tensor:
    """A sharp, clean image that is not the input's (the annotation set's fidelity negatives), (B, 3, H, W) in
    [0, 1]: ``shift<px>`` moves the content px pixels right and down (reflected in at the edges: no seam);
    ``color<g>`` scales red by 1 + g and blue by 1 - g; ``bright<b>`` adds b to every channel."""
    for prefix in ("shift", "color", "bright"):
        if method.startswith(prefix):
            try:
                amount = float(method[len(prefix):])
            except ValueError:
                raise UserError(f"pipeline.methods: {method!r} needs a number after {prefix!r} "
                                f"(e.g. {prefix}{'2' if prefix == 'shift' else '0.1'})") from None
            break
    else:
        raise UserError(f"pipeline.methods: {method!r} is not an unfaithful edit (shift<px>, color<g>, bright<b>)")
    if prefix == "shift":
        px = int(amount)
        if not 0 < px < min(hr.shape[-2:]):
            raise UserError(f"pipeline.methods: {method!r}: the shift must be 1 .. {min(hr.shape[-2:]) - 1} pixels")
        h, w = hr.shape[-2:]
        return F.pad(hr, (px, 0, px, 0), mode="reflect")[..., :h, :w]
    if prefix == "color":
        gain = torch.tensor([1 + amount, 1.0, 1 - amount], dtype=hr.dtype).view(1, 3, 1, 1)
        return (hr * gain).clamp(0, 1)
    return (hr + amount).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-ax**2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def run(job: PipelineJob, cli_overrides: list[str] | None = None, own_overrides: list[str] | None = None,
        config: str = "configs/demo/pipeline.yaml") -> int:
    t0 = time.perf_counter()
    pipe = Pipeline(job, cli_overrides or [], own_overrides)
    if job.pipeline.print_commands:
        print("\n".join(pipe.commands(config)))
        return 0
    rows = pipe.run()
    width = max((len(n) for n, _, _ in rows), default=0)
    lines = [f"pipeline: {job.run.run_dir} ({time.perf_counter() - t0:.0f} s this run)"]
    lines += [f"  {n:<{width}}  {status:<11}  {sec:7.1f} s" for n, status, sec in rows]
    report = job.run.run_dir / "report.html"
    if report.is_file():
        lines.append(f"  report: {report}")
    print("\n".join(lines))
    return 0
