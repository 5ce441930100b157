"""`oars-fast report`: a fake run folder (step logs, an eval output, images) rendered to report.html +
report_files/ + report.png; every referenced file exists, a table row per model, graceful gaps; and, when
Chromium is installed, the page rendered headless without missing images."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oars_fast.config import load_config
from oars_fast.config.evaluation import ReportJob
from oars_fast.data.images import save_image
from oars_fast.stages import report

MODELS = ("bicubic", "sft", "oars")


class _Refs(HTMLParser):
    """src= / href= of every element, and the rows of the metric table."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.imgs: list[str] = []
        self.metric_rows: list[str] = []
        self._in_metrics = self._in_body = self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append(a[key])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table" and "metrics" in (a.get("class") or ""):
            self._in_metrics = True
        if self._in_metrics and tag == "tbody":
            self._in_body = True
        if self._in_body and tag == "th" and "model" in (a.get("class") or ""):
            self._in_th = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_metrics = self._in_body = False
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.metric_rows.append(data)


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _fake_run(root: Path) -> Path:
    """runs/<name>/ with SFT / RL / COMPASS step logs, a sample grid and an eval output of three models."""
    from skimage import data

    rng = np.random.default_rng(0)
    logs = {"sft": ("sft", lambda s: {"loss": 1 / (1 + s / 10) + 0.05 * rng.random(), "lr": 1e-4}),
            "rl_fr": ("rl", lambda s: {"loss": 0.1, "reward": 0.5 + s / 200, "kept": 0.8 + 0.2 * rng.random()}),
            "compass": ("compass_sft", lambda s: {"loss": 2 / (1 + s / 5), "pairwise_accuracy": 0.6 + s / 300})}
    for stage, (stem, rec) in logs.items():
        (root / stage / "logs").mkdir(parents=True)
        with open(root / stage / "logs" / f"{stem}.jsonl", "w") as fh:
            for s in range(1, 61):
                fh.write(json.dumps({"step": s, **rec(s)}) + "\n")
            if stage == "compass":
                fh.write("{not json\n")
    save_image(torch.rand(3, 20, 60), root / "sft" / "samples" / "step_000010.png")
    ev = root / "eval"
    rows = []
    for name in ("astronaut", "coffee"):
        hr = torch.from_numpy(getattr(data, name)()[100:164, 100:164].copy()).permute(2, 0, 1).float() / 255
        lr = F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1)
        save_image(hr, ev / "inputs" / "hr" / f"{name}.png")
        save_image(lr, ev / "inputs" / "lr" / f"{name}.png")
        bic = F.interpolate(lr[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)
        outs = {"bicubic": bic, "sft": (bic + 0.03 * torch.randn_like(bic)).clamp(0, 1),
                "oars": (0.5 * bic + 0.5 * hr).clamp(0, 1)}
        for m, img in outs.items():
            save_image(img, ev / m / f"{name}.png")
            rows.append({"model": m, "image": name, "psnr_y": 25 + MODELS.index(m), "musiq": 50 + 5 * MODELS.index(m),
                         "lr": f"inputs/lr/{name}.png", "hr": f"inputs/hr/{name}.png", "sr": f"{m}/{name}.png"})
    with open(ev / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {"version": 1, "settings": {"benchmark": "folders", "scale": 4, "n_images": 2, "crop_border": 4},
               "images": ["astronaut", "coffee"],
               "metrics": {"psnr_y": {"label": "PSNR-Y", "higher_is_better": True},
                           "musiq": {"label": "MUSIQ", "higher_is_better": True}},
               "models": {m: {"kind": "x", "source": "y", "n_images": 2, "missing": {},
                              "mean": {"psnr_y": 25.0 + i, "musiq": 50.0 + 5 * i}} for i, m in enumerate(MODELS)},
               "skipped": {"dists": "DISTS weights not configured"}, "skipped_images": {}}
    (ev / "metrics.json").write_text(json.dumps(summary))
    return root


def _render(root: Path, *overrides: str):
    job = load_config(ReportJob, None, [f"report.run_root={root}", *overrides])
    return report.render(job)


def test_report_of_a_full_run(tmp_path, capsys):
    root = _fake_run(tmp_path / "runs" / "demo")
    job = load_config(ReportJob, None, [f"report.run_root={root}", "report.examples=2"])
    assert report.run(job) == 0
    out = capsys.readouterr().out
    html_path, png = root / "report.html", root / "report.png"
    assert str(html_path) in out and png.is_file() and png.stat().st_size > 20_000
    refs = _parse(html_path)
    assert refs.refs and all((html_path.parent / r).is_file() for r in refs.refs), refs.refs
    assert all(r.startswith("report_files/") for r in refs.refs)
    assert refs.metric_rows == list(MODELS)
    files = {p.name for p in (root / "report_files").iterdir()}
    # 2 examples x (LR, 3 models, HR) x (overview, zoom), the trade-off, 3 stages' curves, 1 sample grid
    assert len([f for f in files if f.startswith("ex")]) == 2 * 5 * 2
    assert {"tradeoff.png", "curves_0.png", "curves_1.png", "curves_2.png", "samples_0.png"} <= files
    text = html_path.read_text()
    assert "MUSIQ" in text and "DISTS weights not configured" in text and "1 unreadable line(s)" in text
    assert "Training curves" in text and text.count("alt='curves ") == 3
    # a rerender replaces the images, it does not pile them up
    _render(root, "report.examples=1")
    assert len([f for f in (root / "report_files").iterdir() if f.name.startswith("ex")]) == 1 * 5 * 2


def test_missing_parts_are_listed_not_fatal(tmp_path):
    root = tmp_path / "run"
    (root / "sft" / "logs").mkdir(parents=True)
    (root / "sft" / "logs" / "sft.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    html_path, png, page = _render(root, "report.stages=[sft, rl_nr]")
    text = html_path.read_text()
    assert png.is_file() and "Not available" in text
    assert any("no eval output" in n for n in page.notes)
    assert any(n.startswith("curves of rl_nr: not available") for n in page.notes)
    assert all((html_path.parent / r).is_file() for r in _parse(html_path).refs)
    with pytest.raises(report.MissingFileError, match="does not exist"):
        _render(tmp_path / "nothing")


def test_embedded_report_is_one_file(tmp_path):
    root = _fake_run(tmp_path / "run")
    html_path, _, _ = _render(root, "report.embed=true", "report.examples=1", "report.models=[oars, bicubic]")
    refs = _parse(html_path)
    assert refs.imgs and all(s.startswith("data:image/png;base64,") for s in refs.imgs)
    assert not (root / "report_files").exists()
    assert "<th>LR</th><th>oars</th><th>bicubic</th><th>HR</th>" in html_path.read_text()


def test_the_zoom_box_lands_on_the_texture():
    img = np.full((64, 96, 3), 128, np.uint8)
    img[40:56, 60:76] = np.random.default_rng(0).integers(0, 255, (16, 16, 3))
    y, x, side = report.best_box(img, 16, align=4)
    assert side == 16 and y % 4 == 0 and x % 4 == 0 and abs(y - 40) <= 4 and abs(x - 60) <= 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_the_page_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    root = _fake_run(tmp_path / "run")
    html_path, _, _ = _render(root, "report.examples=2")
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    a = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert a.shape[:2] == (2000, 1280) and a.std() > 20  # not blank
    assert (a.min(axis=2) < 200).mean() > 0.05  # a good part of the page is not white: images and plots drew
    dom = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    srcs = re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", dom)
    assert len(srcs) >= 2 * 5 * 2 + 3, srcs
    for s in srcs:
        assert s and (s.startswith("data:") or (html_path.parent / s).is_file()), s


def test_the_ground_truth_row_is_a_reference_not_a_contender(tmp_path):
    """An eval `hr` row (PSNR infinite, hence no mean) is listed, is never marked best, and is a dashed line in
    the trade-off plot instead of a point."""
    root = _fake_run(tmp_path / "runs" / "demo")
    path = root / "eval" / "metrics.json"
    summary = json.loads(path.read_text())
    summary["models"]["HR"] = {"kind": "hr", "source": "hr", "n_images": 2, "missing": {},
                               "mean": {"psnr_y": None, "musiq": 99.0}, "nonfinite": {"psnr_y": 2}}
    path.write_text(json.dumps(summary))
    _render(root, "report.examples=1", "report.perception=[musiq]")
    text = (root / "report.html").read_text()
    assert _parse(root / "report.html").metric_rows == [*MODELS, "HR"]
    assert "<td>99.00</td>" in text and "<b>99.00</b>" not in text
    assert "<td><b>60.00</b></td>" in text  # the best of the models themselves (oars' MUSIQ)
    assert (root / "report_files" / "tradeoff.png").is_file()
    assert "no image has outputs" not in text  # the examples leave the HR entry out: HR is their last column
