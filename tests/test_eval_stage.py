"""`oars-fast eval`: folder pairs and benchmark layouts, bicubic / SR-folder / model entries side by side,
metrics equal to oars_fast.evaluation's, cached model outputs, skipped metrics with reasons, user errors."""
from __future__ import annotations

import csv
import json
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oars_fast.config import ConfigError, load_config
from oars_fast.config.evaluation import EvalJob
from oars_fast.data.images import load_image, save_image
from oars_fast.errors import MissingFileError, UserError
from oars_fast.evaluation import lr_consistency, psnr, ssim
from oars_fast.evaluation.benchmarks import find_benchmark, pair_key
from oars_fast.stages import eval as eval_stage

PHOTOS = ("astronaut", "chelsea", "coffee")


def _photo(name: str, h: int, w: int) -> torch.Tensor:
    from skimage import data

    a = getattr(data, name)()
    t = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).float() / 255
    y, x = (t.shape[1] - h) // 2, (t.shape[2] - w) // 2
    return t[:, y:y + h, x:x + w]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    """HR 64x96 crops of scikit-image photos, their x4 LR (antialiased bicubic), and a folder of another
    method's outputs (bilinear) named like many methods name them (<stem>_x4_SR.png)."""
    root = tmp_path_factory.mktemp("pairs")
    for name in PHOTOS:
        hr = _photo(name, 64, 96)
        lr = F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1)
        save_image(hr, root / "hr" / f"{name}.png")
        save_image(lr, root / "lr" / f"{name}.png")
        save_image(F.interpolate(load_image(root / "lr" / f"{name}.png")[None], scale_factor=4, mode="bilinear")[0],
                   root / "sr_bilinear" / f"{name}_x4_SR.png")
    return root


def _run(tmp_path: Path, *overrides: str, name: str = "ev"):
    job = load_config(EvalJob, None, [f"run.output_dir={tmp_path}", f"run.name={name}", "run.device=cpu",
                                      *overrides])
    assert eval_stage.run(job) == 0
    out = tmp_path / name / "eval"
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((out / "metrics.json").read_text()), out


def test_bicubic_and_an_sr_folder_side_by_side(pair_dir, tmp_path, capsys):
    rows, summary, out = _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'hr'}",
                              f"eval.models=[{{bicubic: bicubic}}, {{bilinear: {pair_dir / 'sr_bilinear'}}}]")
    printed = capsys.readouterr().out
    assert {(r["model"], r["image"]) for r in rows} == {(m, p) for m in ("bicubic", "bilinear") for p in PHOTOS}
    assert list(summary["models"]) == ["bicubic", "bilinear"]
    assert summary["settings"]["crop_border"] == 4 and summary["images"] == sorted(PHOTOS)
    for r in rows:
        hr = load_image(pair_dir / "hr" / f"{r['image']}.png")[None]
        lr = load_image(pair_dir / "lr" / f"{r['image']}.png")[None]
        if r["model"] == "bicubic":  # computed here independently of the stage
            sr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
            sr = (sr * 255).round() / 255  # what is scored is the 8-bit image the stage writes
        else:
            sr = load_image(pair_dir / "sr_bilinear" / f"{r['image']}_x4_SR.png")[None]
            assert Path(r["sr"]) == pair_dir / "sr_bilinear" / f"{r['image']}_x4_SR.png"  # matched by stem
        assert float(r["psnr_y"]) == pytest.approx(float(psnr(sr, hr, 4, y_channel=True)[0]), abs=1e-9)
        assert float(r["psnr_rgb"]) == pytest.approx(float(psnr(sr, hr, 4)[0]), abs=1e-9)
        assert float(r["ssim_y"]) == pytest.approx(float(ssim(sr, hr, 4)[0]), abs=1e-9)
        assert float(r["lr_consistency"]) == pytest.approx(float(lr_consistency(sr, lr, 4)[0]), abs=1e-9)
        # the file the row names is the image that was scored
        sr_file = Path(r["sr"]) if Path(r["sr"]).is_absolute() else out / r["sr"]
        assert float(r["psnr_y"]) == pytest.approx(float(psnr(load_image(sr_file)[None], hr, 4, True)[0]), abs=1e-9)
    for model, m in summary["models"].items():
        mine = [float(r["psnr_y"]) for r in rows if r["model"] == model]
        assert m["n_images"] == 3 and m["mean"]["psnr_y"] == pytest.approx(np.mean(mine), abs=1e-12)
    assert summary["models"]["bicubic"]["mean"]["psnr_y"] > summary["models"]["bilinear"]["mean"]["psnr_y"]
    assert summary["metrics"]["psnr_y"]["higher_is_better"] is True
    # what cannot run is skipped with its reason, never faked
    skipped = summary["skipped"]
    assert {"dists", "compass"} <= set(skipped) and all(len(v) > 20 for v in skipped.values())
    assert "eval.dists_vgg" in skipped["dists"] and "eval.compass" in skipped["compass"]
    for nr in ("musiq", "liqe", "clipiqa", "maniqa"):
        assert nr in skipped or nr in summary["metrics"]
    assert "dists" not in rows[0] and "compass_reward" not in rows[0]
    # the terminal table
    assert "bicubic" in printed and "bilinear" in printed and "PSNR-Y" in printed and "skipped dists:" in printed


def test_back_projected_entry_scores_the_projection_of_its_source(pair_dir, tmp_path):
    """`bp:<entry>` rows are the source's 8-bit outputs back-projected onto their LR (eval.back_projection steps),
    written beside the others; the source's own rows are unchanged."""
    from oars_fast.models.consistency import back_project

    rows, summary, out = _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'hr'}",
                              "eval.metrics=[psnr_y, lr_consistency]", "eval.back_projection=2",
                              f"eval.models=[{{bilinear: {pair_dir / 'sr_bilinear'}}}, {{bil+bp: 'bp:bilinear'}}]")
    assert list(summary["models"]) == ["bilinear", "bil+bp"]
    assert summary["models"]["bil+bp"]["kind"] == "backproject"
    by = {(r["model"], r["image"]): r for r in rows}
    for name in PHOTOS:
        lr = load_image(pair_dir / "lr" / f"{name}.png")[None]
        src = load_image(pair_dir / "sr_bilinear" / f"{name}_x4_SR.png")[None]
        want = (back_project(src, lr, 2) * 255).round() / 255
        r = by[("bil+bp", name)]
        assert torch.equal(load_image(out / r["sr"])[None], want)
        assert float(r["lr_consistency"]) == pytest.approx(float(lr_consistency(want, lr, 4)[0]), abs=1e-9)
        assert float(r["lr_consistency"]) > float(by[("bilinear", name)]["lr_consistency"]) + 3
    with pytest.raises(UserError, match="names no earlier entry"):
        _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", "eval.models=[{x: 'bp:bicubic'}, {bicubic: bicubic}]",
             name="bad")


def test_hr_entry_is_the_ground_truth_as_a_reference_row(pair_dir, tmp_path):
    """`hr` scores the ground truth itself: its LR consistency is what a perfect restoration gets, its PSNR is
    infinite (left out of the mean) and its SSIM 1; without a ground truth the entry has no output, named with the
    reason."""
    rows, summary, _ = _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'hr'}",
                            "eval.metrics=[psnr_y, ssim_y, lr_consistency]",
                            "eval.models=[{bicubic: bicubic}, {HR: hr}]")
    hr_rows = [r for r in rows if r["model"] == "HR"]
    assert len(hr_rows) == 3 and all(Path(r["sr"]) == pair_dir / "hr" / f"{r['image']}.png" for r in hr_rows)
    for r in hr_rows:
        hr = load_image(pair_dir / "hr" / f"{r['image']}.png")[None]
        lr = load_image(pair_dir / "lr" / f"{r['image']}.png")[None]
        assert float(r["psnr_y"]) == float("inf") and float(r["ssim_y"]) == pytest.approx(1.0, abs=1e-12)
        assert float(r["lr_consistency"]) == pytest.approx(float(lr_consistency(hr, lr, 4)[0]), abs=1e-9)
    m = summary["models"]["HR"]
    # these LR are the metric's own downsampling of the HR, so the HR's LR consistency is infinite too
    assert m["kind"] == "hr" and m["mean"]["psnr_y"] is None and m["nonfinite"] == {"psnr_y": 3, "lr_consistency": 3}
    assert m["mean"]["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    _, lq, _ = _run(tmp_path, "eval.benchmark=realset", f"eval.root={pair_dir / 'lr'}",
                    "eval.metrics=[lr_consistency]", "eval.models=[{bicubic: bicubic}, {HR: hr}]", name="lq")
    assert lq["models"]["HR"]["n_images"] == 0
    assert set(lq["models"]["HR"]["missing"].values()) == {"no ground truth (LQ-only input)"}


def test_lq_only_inputs_skip_full_reference_metrics(pair_dir, tmp_path):
    rows, summary, _ = _run(tmp_path, "eval.benchmark=realset", f"eval.root={pair_dir / 'lr'}",
                            "eval.metrics=[psnr_y, ssim_y, lr_consistency, dists]")
    assert len(rows) == 3 and rows[0]["hr"] == ""
    assert set(summary["metrics"]) == {"lr_consistency"}
    for m in ("psnr_y", "ssim_y", "dists"):
        assert "no ground truth" in summary["skipped"][m]


def test_a_model_folder_is_sampled_once_and_reused(pair_dir, tmp_path, monkeypatch):
    from oars_fast.config import ModelConfig
    from oars_fast.models.backbone import build_tiny
    from oars_fast.stages.infer import SuperResolver

    model_dir = tmp_path / "tiny_model"
    build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=0).save_pretrained(model_dir)
    calls = []
    real = SuperResolver.__call__

    def counting(self, lr, seed):
        calls.append(seed)
        return real(self, lr, seed)

    monkeypatch.setattr(SuperResolver, "__call__", counting)
    args = [f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'hr'}", "eval.crop=32", "eval.max_images=2",
            "sampler.steps=1",
            "eval.metrics=[psnr_y, lr_consistency]", f"eval.models=[{{bicubic: bicubic}}, {{tiny: {model_dir}}}]"]
    rows, summary, out = _run(tmp_path, *args)
    assert len(calls) == 2 and summary["models"]["tiny"]["outputs"] == {"computed": 2, "reused": 0}
    assert summary["settings"]["crop"] == 32
    first = {r["image"]: r["psnr_y"] for r in rows if r["model"] == "tiny"}
    for name in PHOTOS[:2]:  # centre crops: LR 8x8, HR and SR 32x32, written once for other methods to use
        assert load_image(out / "inputs" / "lr" / f"{name}.png").shape == (3, 8, 8)
        assert load_image(out / "tiny" / f"{name}.png").shape == (3, 32, 32)
    rows, summary, _ = _run(tmp_path, *args)
    assert len(calls) == 2 and summary["models"]["tiny"]["outputs"] == {"computed": 0, "reused": 2}
    assert {r["image"]: r["psnr_y"] for r in rows if r["model"] == "tiny"} == first
    _run(tmp_path, *args[:-3], "sampler.steps=2", *args[-2:])  # other sampler settings: computed again
    assert len(calls) == 4
    # the same folder, exported again (e.g. pipeline.redo of the stage that wrote it): computed again
    build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=1).save_pretrained(model_dir)
    _run(tmp_path, *args[:-3], "sampler.steps=2", *args[-2:])
    assert len(calls) == 6


def test_benchmark_layouts(tmp_path):
    def img(path: Path, h: int, w: int, seed: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)

    assert pair_key("Canon_001_LR4") == pair_key("Canon_001_HR") == "canon_001"
    assert pair_key("0801x4") == pair_key("0801") == "0801" and pair_key("a_x4_SR", sr=True) == "a"
    # RealSR as released: LR registered on the HR grid (same size), Train/ ignored
    rs = tmp_path / "RealSR"
    for cam in ("Canon", "Nikon"):
        img(rs / cam / "Test" / "4" / f"{cam}_001_HR.png", 64, 48)
        img(rs / cam / "Test" / "4" / f"{cam}_001_LR4.png", 64, 48, 1)
        img(rs / cam / "Train" / "4" / f"{cam}_099_LR4.png", 64, 48, 2)
        img(rs / cam / "Train" / "4" / f"{cam}_099_HR.png", 64, 48, 2)
    b = find_benchmark("realsr", rs)
    assert [p.name for p in b.pairs] == ["Canon_001_LR4", "Nikon_001_LR4"] and b.crop == 512 and b.has_hr
    # DRealSR: Test_x4/test_LR/<name>_x4 + test_HR/<name>_x1
    dr = tmp_path / "DRealSR"
    img(dr / "Test_x4" / "test_LR" / "a_x4.png", 8, 8)
    img(dr / "Test_x4" / "test_HR" / "a_x1.png", 32, 32)
    b = find_benchmark("drealsr", dr)
    assert b.pairs[0].hr.name == "a_x1.png" and "prepared pairs" in b.layout
    # DIV2K-val from HR only: LR synthesised
    dv = tmp_path / "DIV2K"
    img(dv / "DIV2K_valid_HR" / "0801.png", 40, 44)
    b = find_benchmark("div2k_val", dv)
    assert b.synthetic and b.pairs[0].lr is None
    # the prepared inputs: RealSR's same-size LR downsampled x4, centre crops; DIV2K's LR made by the chain
    job = load_config(EvalJob, None, [f"run.output_dir={tmp_path}", "eval.benchmark=realsr", f"eval.root={rs}",
                                      "eval.crop=32"])
    items, skipped = eval_stage.prepare_inputs(job, find_benchmark("realsr", rs), tmp_path / "in")
    assert not skipped and items[0].full_lr_hw == (16, 12) and items[0].box == (4, 2, 8, 8)
    assert load_image(items[0].lr_path).shape == (3, 8, 8) and load_image(items[0].hr_path).shape == (3, 32, 32)
    job = load_config(EvalJob, None, [f"run.output_dir={tmp_path}", "eval.benchmark=div2k_val", f"eval.root={dv}",
                                      "eval.crop=32"])
    (item,), _ = eval_stage.prepare_inputs(job, find_benchmark("div2k_val", dv), tmp_path / "in2")
    (again,), _ = eval_stage.prepare_inputs(job, find_benchmark("div2k_val", dv), tmp_path / "in3")
    lr = load_image(item.lr_path)
    assert lr.shape == (3, 8, 8) and torch.equal(lr, load_image(again.lr_path))  # seeded per image


def test_missing_folders_and_bad_entries_are_user_errors(pair_dir, tmp_path):
    def job(*o):
        return load_config(EvalJob, None, [f"run.output_dir={tmp_path}", *o])

    with pytest.raises(UserError, match="eval.lr_dir is not set"):
        eval_stage.run(job())
    with pytest.raises(MissingFileError, match="/nonexistent/lr"):
        eval_stage.run(job("eval.lr_dir=/nonexistent/lr"))
    with pytest.raises(MissingFileError, match="/nonexistent/hr"):
        eval_stage.run(job(f"eval.lr_dir={pair_dir / 'lr'}", "eval.hr_dir=/nonexistent/hr"))
    with pytest.raises(MissingFileError, match="/nonexistent/realsr"):
        eval_stage.run(job("eval.benchmark=realsr", "eval.root=/nonexistent/realsr"))
    with pytest.raises(MissingFileError, match="sft: /nonexistent/model does not exist"):
        eval_stage.run(job(f"eval.lr_dir={pair_dir / 'lr'}", "eval.models=[{sft: /nonexistent/model}]"))
    with pytest.raises(MissingFileError, match="no ground truth matches"):
        eval_stage.run(job(f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'sr_bilinear'}",
                           "eval.metrics=[psnr_y]"))
    with pytest.raises(ConfigError, match="appears twice"):
        job("eval.models=[{a: bicubic}, {a: bicubic}]")
    with pytest.raises(ConfigError, match="valid values"):
        job("eval.metrics=[psnr]")
    with pytest.raises(ConfigError, match="multiple of scale"):
        job("eval.crop=30")


def test_the_cli_turns_a_missing_folder_into_one_line(tmp_path, capsys):
    from oars_fast.cli import COMMANDS, main

    if COMMANDS["eval"].runner is None:
        pytest.skip("`eval` is not registered in oars_fast.cli.COMMANDS yet")
    assert main(["eval", f"run.output_dir={tmp_path}", "eval.lr_dir=/nonexistent/lr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "/nonexistent/lr" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_nr_iqa_and_compass_plugins(pair_dir, tmp_path, monkeypatch):
    """A stand-in pyiqa (one metric builds, one tries to download and is refused offline), a stand-in COMPASS
    module and DISTS with random weights: the columns they give, the reasons of what they do not."""
    tried = []

    def create_metric(name, device=None, as_loss=False):
        if name == "liqe":
            try:
                urllib.request.urlopen("https://example.invalid/liqe.pt")
            except OSError as e:
                tried.append(str(e))
                raise
        return lambda x: x.mean(dim=(1, 2, 3)) * 100

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric, __version__="0"))

    class FakeCompass:
        @classmethod
        def from_pretrained(cls, path, dtype=torch.float32):
            return cls()

        def score(self, lr, sr, group_index):
            n = sr.shape[0]
            return torch.full((n,), 0.8), torch.full((n,), 3.0), sr.mean(dim=(1, 2, 3)) * 4 + 1

    monkeypatch.setitem(sys.modules, "oars_fast.rewards.compass", types.SimpleNamespace(CompassModel=FakeCompass))
    (tmp_path / "compass_ckpt").mkdir()
    # DISTS with random weights in the release's file layouts (the real ones cannot be downloaded here)
    from safetensors.torch import save_file

    from oars_fast.rewards.dists import _CONVS, CHANNELS, DISTS

    g = torch.Generator().manual_seed(0)
    vgg = {}
    for idx, cin, cout in _CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(cout)
    save_file(vgg, tmp_path / "vgg.safetensors")
    n = sum(CHANNELS)
    save_file({"alpha": torch.rand(1, n, 1, 1, generator=g), "beta": torch.rand(1, n, 1, 1, generator=g)},
              tmp_path / "ab.safetensors")
    rows, summary, out = _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", f"eval.hr_dir={pair_dir / 'hr'}",
                              "eval.max_images=1", "eval.metrics=[psnr_y, dists, compass, musiq, liqe]",
                              f"eval.compass={tmp_path / 'compass_ckpt'}",
                              f"eval.dists_vgg={tmp_path / 'vgg.safetensors'}",
                              f"eval.dists_weights={tmp_path / 'ab.safetensors'}")
    d = DISTS(tmp_path / "vgg.safetensors", tmp_path / "ab.safetensors")
    r = rows[0]
    sr, hr = load_image(out / r["sr"])[None], load_image(pair_dir / "hr" / f"{r['image']}.png")[None]
    assert float(r["dists"]) == pytest.approx(float(d(sr, hr)[0]), abs=1e-6) and 0 < float(r["dists"]) < 1
    assert summary["metrics"]["dists"]["higher_is_better"] is False
    assert tried and "download refused (offline)" in tried[0]
    assert "liqe" in summary["skipped"] and "download refused" in summary["skipped"]["liqe"]
    assert {"musiq", "compass_reward", "compass_f", "compass_q_lr", "compass_q_sr"} <= set(summary["metrics"])
    f, q_lr, q_sr = float(r["compass_f"]), float(r["compass_q_lr"]), float(r["compass_q_sr"])
    assert float(r["compass_reward"]) == pytest.approx(f * q_lr + f ** (q_lr / 7.0) * (q_sr - q_lr), rel=1e-5)
    assert float(r["musiq"]) > 0
    # without a checkpoint, or with one that does not exist: skipped with the reason
    _, summary, _ = _run(tmp_path, f"eval.lr_dir={pair_dir / 'lr'}", "eval.metrics=[compass, lr_consistency]",
                         "eval.compass=/nonexistent/compass", name="ev2")
    assert "/nonexistent/compass not found" in summary["skipped"]["compass"]
