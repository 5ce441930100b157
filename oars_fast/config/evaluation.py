"""Configs of the evaluation commands: `oars-fast eval` (:class:`EvalJob`) and `oars-fast report`
(:class:`ReportJob`). They reuse the component sections (run, model, sampler, infer, degradation) and
add one section each (:class:`EvalConfig`, :class:`ReportConfig`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .components import DegradationConfig, InferConfig, ModelConfig, RunConfig, SamplerConfig
from .schema import ConfigError, Section, check_range, doc, section

METRICS = Literal["psnr_y", "ssim_y", "psnr_rgb", "lr_consistency", "dists", "compass", "musiq", "liqe", "clipiqa",
                  "maniqa"]
ALL_METRICS = ["psnr_y", "ssim_y", "psnr_rgb", "lr_consistency", "dists", "compass", "musiq", "liqe", "clipiqa",
               "maniqa"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_RESERVED = ("inputs", "metrics.csv", "metrics.json", "eval_config.yaml")  # what eval writes beside the models


@dataclass
class EvalConfig(Section):
    """What `oars-fast eval` compares, on which images, with which metrics.

    Model entries (``models``): a list of ``name: kind`` mappings, in the order of the table:

    * ``bicubic``: bicubic upsampling of the LR (the baseline);
    * a model folder (``transformer/`` + ``vae/``, as ``sft``, ``merge`` and ``rl`` write them), or
      ``model:<folder or hub id>``: the LR super-resolved with the flow-matching sampler (``sampler``,
      ``infer`` tiling, ``model`` dtype/conditioning); outputs cached in ``<run>/eval/<name>/``;
    * a folder of SR images, or ``sr:<folder>``: outputs of any method, matched to the LR by file stem.
    """

    benchmark: Literal["folders", "realsr", "drealsr", "div2k_val", "realset"] = doc(
        "folders", "folders | realsr | drealsr | div2k_val | realset: eval.lr_dir (+ optional eval.hr_dir), or a "
        "benchmark's folder layout under eval.root (oars_fast/evaluation/benchmarks.py documents each; the user "
        "brings the files, nothing is downloaded)")
    root: str | None = doc(None, "the benchmark's folder (benchmark != folders)")
    lr_dir: str | None = doc(None, "benchmark=folders: folder of LR inputs")
    hr_dir: str | None = doc(None, "benchmark=folders: folder of ground truths matched to the LR by file stem "
                             "(optional; without it full-reference metrics are skipped)")
    models: list[dict] = doc(None, "the models side by side, a list of `name: kind` entries: `bicubic`, `hr` (the "
                             "ground truth itself, a reference row), a model folder (or model:<folder|hub id>), a "
                             "folder of SR outputs (or sr:<folder>), or bp:<earlier entry> (its outputs "
                             "back-projected onto the LR, eval.back_projection steps)",
                             factory=lambda: [{"bicubic": "bicubic"}])
    scale: Literal[1, 2, 4, 8] = doc(4, "super-resolution factor")
    crop: int | None = doc(None, "centre crop, HR side (the LR is cropped to crop/scale at the same place); null: the "
                           "benchmark's protocol (realsr, drealsr, div2k_val: HR 512 / LR 128; folders, realset: "
                           "whole images); 0: whole images")
    crop_border: int | None = doc(None, "pixels cut from each side before PSNR / SSIM; null: the scale (4 for x4)")
    max_images: int = doc(0, "evaluate only the first N images (sorted by name; 0: all)")
    metrics: list[METRICS] = doc(None, "metrics to compute (those that cannot run are listed as skipped with the "
                                 "reason): psnr_y, ssim_y, psnr_rgb, lr_consistency, dists (needs dists_vgg and "
                                 "dists_weights), compass (needs compass), musiq, liqe, clipiqa, maniqa (need pyiqa "
                                 "and its weights offline)", factory=lambda: list(ALL_METRICS))
    dists_vgg: str | None = doc(None, "DISTS: VGG16 weights in torchvision's vgg16() layout (as reward.dists_vgg)")
    dists_weights: str | None = doc(None, "DISTS: alpha/beta weights.pt of the DISTS release (as "
                                    "reward.dists_weights)")
    compass: str | None = doc(None, "COMPASS checkpoint folder (oars_fast.rewards.compass.CompassModel): reward R "
                              "and its parts F, Q_LR, Q_SR per image")
    compass_gamma: float = doc(7.0, "COMPASS R's gamma: R = F*Q_LR + F**(Q_LR/gamma) * (Q_SR - Q_LR)")
    nr_offline: bool = doc(True, "no-reference metrics (pyiqa): refuse downloads while building them, so a metric "
                           "whose weights are not in pyiqa's cache is skipped; false lets pyiqa download them")
    degrade_seed: int = doc(20250101, "div2k_val from HR only: image i is degraded (Real-ESRGAN chain, "
                            "`degradation`) with seed (degrade_seed, i), the same LR on every machine")
    back_projection: int = doc(1, "iterative back-projection steps of the bp:<entry> models "
                               "(oars_fast/models/consistency.py)")
    overwrite: bool = doc(False, "recompute the model outputs cached in <run>/eval/<name>/ even when their LR, model "
                          "and sampler settings are unchanged")

    def check(self) -> None:
        # eval.lr_dir / eval.root are checked when the job runs (the defaults must build: `--help` shows them)
        entries = self.model_entries()
        if not entries:
            raise ConfigError("EvalConfig.models must name at least one model, e.g. [{bicubic: bicubic}]")
        check_range(self, "max_images", 0)
        check_range(self, "back_projection", 1)
        check_range(self, "compass_gamma", 0.0, lo_open=True)
        if self.crop is not None:
            check_range(self, "crop", 0)
            if self.crop % self.scale:
                raise ConfigError(f"EvalConfig.crop={self.crop} must be a multiple of scale={self.scale}")
        if self.crop_border is not None:
            check_range(self, "crop_border", 0)
        if not self.metrics:
            raise ConfigError(f"EvalConfig.metrics must name at least one metric; valid values: {ALL_METRICS}")

    def model_entries(self) -> list[tuple[str, str]]:
        """``models`` as ordered (name, kind) pairs, checked: folder-safe unique names, string kinds."""
        out: list[tuple[str, str]] = []
        for i, entry in enumerate(self.models):
            if not isinstance(entry, dict) or not entry:
                raise ConfigError(f"EvalConfig.models[{i}]={entry!r} must be a mapping `name: kind` (kind: bicubic, "
                                  "hr, a model folder, model:<folder|hub id>, a folder of SR images or sr:<folder>)")
            for name, kind in entry.items():
                name = str(name)
                if not _NAME.match(name) or name in _RESERVED:
                    raise ConfigError(f"EvalConfig.models[{i}]: name {name!r} must be a folder name (letters, digits, "
                                      f"_ . + -) other than {list(_RESERVED)}")
                if not isinstance(kind, str) or not kind.strip():
                    raise ConfigError(f"EvalConfig.models[{i}]: {name}={kind!r} must be bicubic, hr, a model folder, "
                                      "model:<folder|hub id>, a folder of SR images or sr:<folder>")
                if name in {n for n, _ in out}:
                    raise ConfigError(f"EvalConfig.models: the name {name!r} appears twice")
                out.append((name, kind.strip()))
        return out

    @property
    def border(self) -> int:
        return self.scale if self.crop_border is None else self.crop_border


def _eval_sampler() -> SamplerConfig:
    return SamplerConfig(steps=40)


@dataclass
class EvalJob(Section):
    """`oars-fast eval`: several models side by side on a folder pair or a benchmark layout: PSNR / SSIM (Y),
    PSNR (RGB), LR consistency, DISTS, COMPASS, no-reference metrics -> <run>/eval/metrics.csv, metrics.json."""

    run: RunConfig = section(RunConfig)
    model: ModelConfig = section(ModelConfig, "how model folders are loaded (dtype, condition, attention); "
                                 "model.pretrained is ignored: each model entry names its folder")
    sampler: SamplerConfig = section(_eval_sampler, "the sampler of model entries (40 steps, as inference)")
    infer: InferConfig = section(InferConfig, "tiling of model entries (batch_size, tile, tile_overlap, max_pixels); "
                                 "input / output / checkpoint are not read")
    degradation: DegradationConfig = section(DegradationConfig, "benchmark=div2k_val from HR only: the synthetic "
                                             "degradation (Real-ESRGAN x4plus defaults)")
    eval: EvalConfig = section(EvalConfig)

    def check(self) -> None:
        if self.eval.benchmark == "div2k_val" and self.degradation.kind != "realesrgan":
            raise ConfigError("benchmark=div2k_val synthesises its LR with the Real-ESRGAN chain: "
                              f"degradation.kind={self.degradation.kind!r} is not valid here; choose one of "
                              "['realesrgan']")


@dataclass
class ReportConfig(Section):
    """What `oars-fast report` reads and how it draws it."""

    run_root: str | None = doc(None, "the run folder holding the stages (e.g. runs/demo); null: run.output_dir/"
                               "run.name")
    stages: list[str] = doc(None, "stage folders under run_root whose logs/*.jsonl give training curves (e.g. "
                            "[sft, rl_fr, rl_nr, compass]); empty: every <run_root>/*/logs/*.jsonl",
                            factory=list)
    eval_dir: str | None = doc(None, "eval output folder (metrics.json, metrics.csv); null: <run_root>/eval")
    output: str | None = doc(None, "the HTML file; null: <run_root>/report.html (images in report_files/ beside "
                             "it, summary figure report.png)")
    models: list[str] = doc(None, "grid columns between LR and HR, in order (e.g. [bicubic, sft, oars]); empty: "
                            "every model of the eval", factory=list)
    examples: int = doc(4, "images shown as LR | models | HR rows with zoomed crops")
    zoom_box: int = doc(0, "side (HR pixels) of the zoomed crop, placed on the highest-gradient region of the HR "
                        "(LQ-only: of the first model's output); 0: a quarter of the shorter side, at least 8")
    cell: int = doc(192, "display side (pixels) of every image cell of the grids")
    fidelity: str = doc("psnr_y", "x axis of the perception-fidelity plot (a metric of metrics.json)")
    perception: list[str] = doc(
        None, "y axis of that plot: the first of these metrics that metrics.json has", factory=lambda: [
            "compass_reward", "musiq", "liqe", "clipiqa", "maniqa", "dists", "lr_consistency"])
    embed: bool = doc(False, "embed images as data URIs (one self-contained file) instead of report_files/")
    title: str = doc("", "page title; empty: 'oars-fast report: <run folder>'")

    def check(self) -> None:
        check_range(self, "examples", 0)
        check_range(self, "zoom_box", 0)
        check_range(self, "cell", 32)
        for s in self.stages:
            if not s or "/" in s or s in (".", ".."):
                raise ConfigError(f"ReportConfig.stages has {s!r}: each must be a folder name under run_root")


@dataclass
class ReportJob(Section):
    """`oars-fast report`: runs/<name>/report.html (+ report.png): eval metric table, LR | models | HR grids with
    zoomed crops, training curves, perception-fidelity trade-off."""

    run: RunConfig = section(RunConfig)
    report: ReportConfig = section(ReportConfig)
