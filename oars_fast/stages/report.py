"""`oars-fast report`: one HTML page (and a PNG summary) of a run, opened in any browser.

``<run_root>/report.html`` with its images beside it in ``report_files/`` (or embedded as data URIs,
``report.embed=true``), and ``<run_root>/report.png`` (the summary figure, for terminals). Sections:

1. metrics: the table of ``oars-fast eval``'s ``metrics.json`` (means per model; best per column in bold;
   skipped metrics with their reasons; the settings);
2. perception-fidelity trade-off: one point per model, ``report.fidelity`` (PSNR-Y) against the first of
   ``report.perception`` that the eval has (COMPASS reward, MUSIQ, LIQE, ..., DISTS, LR consistency);
3. examples: LR | models (e.g. bicubic | SFT | OARS) | HR rows from the eval's outputs, each image with a
   box on its highest-gradient region and that box enlarged below it (nearest neighbour: real pixels);
4. training curves from the stages' step logs (``<run_root>/<stage>/logs/*.jsonl``): loss (SFT, COMPASS),
   reward mean and eval reward (RL), kept-group fraction (RL), pairwise accuracy (COMPASS), when present;
5. the newest sample grid of each stage (``<stage>/samples/``).

Whatever is missing (no eval yet, a stage that has not run, a metric that was skipped) is listed as
"not available: <reason>"; the report never fails for it. Plots are drawn by matplotlib (Agg backend).

Launch: ``oars-fast report --config configs/demo/report.yaml`` or ``oars-fast report report.run_root=runs/demo``.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..config.evaluation import ReportJob
from ..errors import MissingFileError, UserError

log = logging.getLogger(__name__)

PANELS = [  # (title, jsonl keys plotted together)
    ("loss", ["loss", "val_loss", "eval_loss"]),
    ("reward (mean)", ["reward", "eval_reward"]),
    ("kept group fraction", ["kept"]),
    ("pairwise accuracy", ["heldout_pair_acc", "heldout_pair_acc_qsr", "pairwise_accuracy", "accuracy",
                           "val_accuracy", "eval_accuracy", "val_pairwise_accuracy"]),
]


@dataclass
class Curves:
    stage: str  # stage folder
    file: Path
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values)
    bad_lines: int = 0


@dataclass
class Page:
    """What the page shows, gathered before anything is drawn."""

    title: str
    run_root: Path
    eval_dir: Path
    summary: dict | None = None
    rows: list[dict] = field(default_factory=list)
    curves: list[Curves] = field(default_factory=list)
    samples: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "not available: ..." lines


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path: Path, stage: str) -> Curves:
    """Numeric series per key; a resumed run's repeated steps keep their last value; bad lines counted."""
    per_key: dict[str, dict[int, float]] = {}
    bad = 0
    with open(path, errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    per_key.setdefault(k, {})[step] = float(v)
    series = {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in per_key.items()}
    return Curves(stage, path, series, bad)


def _resolve(p: str, base: Path) -> Path | None:
    if not p:
        return None
    path = Path(p)
    return path if path.is_absolute() else base / path


def gather(job: ReportJob) -> Page:
    cfg = job.report
    root = Path(cfg.run_root).expanduser() if cfg.run_root else job.run.run_dir
    if not root.is_dir():
        raise MissingFileError(f"report.run_root={root} does not exist: the run folder whose stages and eval to "
                               "report (e.g. runs/demo)")
    eval_dir = Path(cfg.eval_dir).expanduser() if cfg.eval_dir else root / "eval"
    page = Page(cfg.title or f"oars-fast report: {root}", root, eval_dir)
    # the eval
    mj = eval_dir / "metrics.json"
    if not mj.is_file():
        page.notes.append(f"metrics, trade-off and examples: not available: no eval output at {mj} (run "
                          f"`oars-fast eval` with run.output_dir/run.name pointing at {root})")
    else:
        try:
            page.summary = json.loads(mj.read_text())
            if not isinstance(page.summary.get("models"), dict):
                raise ValueError("no 'models' mapping")
        except (OSError, ValueError) as e:
            page.summary = None
            page.notes.append(f"metrics: not available: {mj} cannot be read ({e})")
        mc = eval_dir / "metrics.csv"
        if page.summary is not None and mc.is_file():
            with open(mc, newline="") as fh:
                page.rows = list(csv.DictReader(fh))
        elif page.summary is not None:
            page.notes.append(f"examples: not available: {mc} is missing")
    # the stages' step logs
    if cfg.stages:
        for stage in cfg.stages:
            files = sorted((root / stage / "logs").glob("*.jsonl"))
            if not files:
                page.notes.append(f"curves of {stage}: not available: no {root / stage / 'logs'}/*.jsonl (the stage "
                                  "has not run in this run folder)")
            page.curves += [read_jsonl(f, stage) for f in files]
    else:
        # in the order the stages ran (their logs' last writes)
        files = sorted(root.glob("*/logs/*.jsonl"), key=lambda p: (p.stat().st_mtime, str(p)))
        page.curves = [read_jsonl(f, f.parent.parent.name) for f in files]
        if not page.curves:
            page.notes.append(f"training curves: not available: no {root}/<stage>/logs/*.jsonl")
    for c in page.curves:
        if c.bad_lines:
            page.notes.append(f"{c.file}: {c.bad_lines} unreadable line(s) skipped")
        if not any(k in c.series for _, keys in PANELS for k in keys):
            page.notes.append(f"curves of {c.stage} ({c.file.name}): not available: none of the keys "
                              f"{[k for _, ks in PANELS for k in ks]} in its lines")
    # the stages' newest sample grids
    stage_dirs = [root / s for s in cfg.stages] if cfg.stages else sorted(p for p in root.iterdir() if p.is_dir())
    for d in stage_dirs:
        grids = sorted((d / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime) if (d / "samples").is_dir() \
            else []
        if grids:
            page.samples.append((d.name, grids[-1]))
    page.samples.sort(key=lambda t: t[1].stat().st_mtime)  # in the order the stages ran
    return page


# ----------------------------------------------------------------------------------------------------
# images: crops and zooms
# ----------------------------------------------------------------------------------------------------


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def best_box(img: np.ndarray, side: int, align: int = 1) -> tuple[int, int, int]:
    """(y, x, side) of the `side` x `side` window with the largest summed gradient magnitude of the luma,
    corners on multiples of `align` (so the LR's box, divided by the scale, falls on whole pixels)."""
    h, w = img.shape[:2]
    side = max(align, min(side, h, w) // align * align)
    y = img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    g = np.zeros_like(y)
    g[:, :-1] += np.abs(np.diff(y, axis=1))
    g[:-1, :] += np.abs(np.diff(y, axis=0))
    ii = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[side:, side:] - ii[:-side, side:] - ii[side:, :-side] + ii[:-side, :-side]  # (h-side+1, w-side+1)
    ys = np.arange(0, h - side + 1, align)
    xs = np.arange(0, w - side + 1, align)
    sub = sums[np.ix_(ys, xs)]
    iy, ix = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(ys[iy]), int(xs[ix]), side


def _cells(img: np.ndarray, box: tuple[int, int, int], factor: float, size: tuple[int, int],
           cell: int) -> tuple[Image.Image, Image.Image]:
    """(overview with the box drawn, the box enlarged) of `img`; `factor`: img pixels per HR pixel."""
    im = Image.fromarray(img)
    up = size[0] >= im.width
    view = im.resize(size, Image.NEAREST if up else Image.LANCZOS)
    y, x, s = (int(round(v * factor)) for v in box)
    s = max(1, s)
    zoom = im.crop((x, y, x + s, y + s)).resize((cell, cell), Image.NEAREST)
    sx, sy = size[0] / im.width, size[1] / im.height
    d = ImageDraw.Draw(view)
    d.rectangle([x * sx, y * sy, (x + s) * sx - 1, (y + s) * sy - 1], outline=(255, 40, 40), width=2)
    return view, zoom


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------


class _Writer:
    """Stores images (report_files/ or data URIs) and returns what an <img src> needs."""

    def __init__(self, html_path: Path, embed: bool):
        self.embed = embed
        self.dir = html_path.with_name(html_path.stem + "_files")
        self.rel = self.dir.name
        if not embed:
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob("*.png"):  # our own folder: last render's images
                old.unlink()
        self.files: list[Path] = []

    def png(self, name: str, image: Image.Image | None = None, fig=None) -> str:
        if self.embed:
            import io

            buf = io.BytesIO()
            if fig is not None:
                fig.savefig(buf, format="png", dpi=100)
            else:
                image.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        path = self.dir / name
        if fig is not None:
            fig.savefig(path, dpi=100)
        else:
            image.save(path)
        self.files.append(path)
        return f"{self.rel}/{name}"


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if "psnr" in key or key in ("lr_consistency", "musiq") else f"{v:.4f}"


def _metric_cols(summary: dict) -> list[str]:
    metrics = summary.get("metrics", {})
    return [c for c in metrics if any(m.get("mean", {}).get(c) is not None for m in summary["models"].values())]


def _arrow(info: dict) -> str:
    return {True: " ↑", False: " ↓"}.get(info.get("higher_is_better"), "")


def _metric_table(summary: dict) -> str:
    cols = _metric_cols(summary)
    metrics = summary["metrics"]
    # the ground truth (an eval `hr` entry) is a reference, never marked best
    contenders = {n: m for n, m in summary["models"].items() if m.get("kind") != "hr"}
    best = {}
    for c in cols:
        hib = metrics[c].get("higher_is_better")
        vals = [m["mean"].get(c) for m in contenders.values() if m["mean"].get(c) is not None]
        if hib is not None and len(vals) > 1:
            best[c] = max(vals) if hib else min(vals)
    head = "".join(f"<th title='{html.escape(metrics[c].get('description', ''))}'>"
                   f"{html.escape(metrics[c].get('label', c) + _arrow(metrics[c]))}</th>" for c in cols)
    body = []
    for name, m in summary["models"].items():
        cells = []
        for c in cols:
            v = m["mean"].get(c)
            text = _fmt(v, c)
            mark = name in contenders and v is not None and best.get(c) == v
            cells.append(f"<td><b>{text}</b></td>" if mark else f"<td>{text}</td>")
        src = html.escape(f"{m.get('kind', '')}: {m.get('source', '')}")
        body.append(f"<tr><th class='model' title='{src}'>{html.escape(name)}</th><td>{m.get('n_images', '')}</td>"
                    f"{''.join(cells)}</tr>")
    return (f"<table class='metrics'><thead><tr><th>model</th><th>images</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _tradeoff_axes(summary: dict, cfg) -> tuple[str, str] | str:
    """(x, y) metric keys of the trade-off plot, or why there is none."""
    have = set(_metric_cols(summary))
    if cfg.fidelity not in have:
        return f"the fidelity metric {cfg.fidelity!r} is not in the eval (has: {sorted(have) or 'none'})"
    y = next((m for m in cfg.perception if m in have and m != cfg.fidelity), None)
    if y is None:
        skipped = summary.get("skipped", {})
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items() if k in cfg.perception or
                        f"{k}_reward" in cfg.perception)
        return f"none of {cfg.perception} is in the eval" + (f" (skipped: {why})" if why else "")
    return cfg.fidelity, y


def _plot_tradeoff(plt, ax, summary: dict, xk: str, yk: str) -> None:
    metrics = summary["metrics"]
    pts = [(i, name, m["mean"].get(xk), m["mean"].get(yk)) for i, (name, m) in enumerate(summary["models"].items())]
    # a row with y but no finite x (the ground truth: PSNR infinite) is a horizontal reference line
    refs = [p for p in pts if p[2] is None and p[3] is not None]
    pts = [p for p in pts if p[2] is not None and p[3] is not None]
    xs, ys = [p[2] for p in pts], [p[3] for p in pts]
    for i, name, _, y in refs:
        ax.axhline(y, color=plt.cm.tab10(i % 10), linestyle="--", linewidth=1, alpha=0.8, label=name)
    if refs:
        ax.legend(fontsize=8, loc="lower left")
    dx, dy = (max(xs, default=0.0) - min(xs, default=0.0)) or 1.0, (max(ys, default=0.0) - min(ys, default=0.0)) or 1.0
    placed: list[tuple[float, float]] = []
    for i, name, x, y in pts:
        near = sum(abs(x - px) < 0.03 * dx and abs(y - py) < 0.03 * dy for px, py in placed)  # stack their labels
        placed.append((x, y))
        ax.scatter([x], [y], s=60, color=plt.cm.tab10(i % 10), zorder=3, alpha=0.8)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=9,
                    color=plt.cm.tab10(i % 10))
    ax.set_xlabel(metrics[xk].get("label", xk) + _arrow(metrics[xk]))
    ax.set_ylabel(metrics[yk].get("label", yk) + _arrow(metrics[yk]))
    if metrics[yk].get("higher_is_better") is False:
        ax.invert_yaxis()  # better is up
    ax.grid(alpha=0.3)
    ax.set_title("perception-fidelity trade-off (better: up and right)", fontsize=10)


def _summary_rank(panel: tuple[str, list[str]]) -> int:
    """report.png shows one panel per stage: its reward, else its pairwise accuracy, else its loss."""
    return {"reward (mean)": 0, "pairwise accuracy": 1, "loss": 2}.get(panel[0], 3)


def _smooth(v: np.ndarray) -> np.ndarray:
    n = len(v)
    k = max(1, n // 20)
    if k == 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([v[: k - 1].cumsum() / np.arange(1, k), out])


def _plot_curves(plt, c: Curves):
    panels = [(t, [k for k in keys if k in c.series]) for t, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for j, k in enumerate(keys):
            steps, vals = c.series[k]
            color = plt.cm.tab10(j)
            if len(vals) >= 40:
                ax.plot(steps, vals, color=color, alpha=0.3, lw=0.8)
                ax.plot(steps, _smooth(vals), color=color, lw=1.5, label=f"{k} (smoothed)")
            else:
                ax.plot(steps, vals, color=color, lw=1.5, marker="o" if len(vals) < 8 else None, ms=3, label=k)
        ax.set_title(f"{c.stage}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _examples(page: Page, cfg, writer: _Writer) -> tuple[str, list[tuple[str, Image.Image, Image.Image]]]:
    """The example rows as HTML, and the first row's (column, overview, zoom) images (for report.png)."""
    summary, rows = page.summary, page.rows
    # the ground truth (an eval `hr` entry) is the grid's last column already
    models = cfg.models or [n for n, m in summary["models"].items() if m.get("kind") != "hr"]
    unknown = [m for m in models if m not in summary["models"]]
    if unknown:
        page.notes.append(f"examples: models {unknown} are not in the eval (has {list(summary['models'])})")
        models = [m for m in models if m in summary["models"]]
    by = {(r["model"], r["image"]): r for r in rows}
    scale = int(summary.get("settings", {}).get("scale", 4))
    chosen = [im for im in summary.get("images", []) if all((m, im) in by for m in models)][:cfg.examples]
    if not models or not chosen:
        page.notes.append("examples: not available: no image has outputs of every shown model")
        return "", []
    parts, first = [], []
    for n, image in enumerate(chosen):
        r0 = by[(models[0], image)]
        lr_p, hr_p = _resolve(r0.get("lr", ""), page.eval_dir), _resolve(r0.get("hr", ""), page.eval_dir)
        cols: list[tuple[str, Path, float]] = []
        if lr_p is not None and lr_p.is_file():
            cols.append(("LR", lr_p, 1.0 / scale))
        cols += [(m, _resolve(by[(m, image)].get("sr", ""), page.eval_dir), 1.0) for m in models]
        if hr_p is not None and hr_p.is_file():
            cols.append(("HR", hr_p, 1.0))
        try:
            imgs = [(name, _load_rgb(p), f) for name, p, f in cols]
        except (OSError, TypeError, AttributeError) as e:
            page.notes.append(f"example {image}: not available: an image cannot be read ({e})")
            continue
        ref = next((a for name, a, _ in imgs if name == "HR"), next(a for name, a, f in imgs if f == 1.0))
        H, W = ref.shape[:2]
        side = cfg.zoom_box or max(8, min(H, W) // 4)
        box = best_box(ref, side, align=scale)
        size = (cfg.cell, max(1, round(cfg.cell * H / W)))
        heads, views, zooms = [], [], []
        for name, a, f in imgs:
            view, zoom = _cells(a, box, f, size, cfg.cell)
            stem = f"ex{n}_{len(views)}"
            heads.append(f"<th>{html.escape(name)}</th>")
            views.append(f"<td><img src='{writer.png(stem + '.png', view)}' alt='{html.escape(name)} {image}' "
                         f"width='{size[0]}' height='{size[1]}'></td>")
            zooms.append(f"<td><img class='zoom' src='{writer.png(stem + '_zoom.png', zoom)}' "
                         f"alt='{html.escape(name)} {image} zoom' width='{cfg.cell}' height='{cfg.cell}'></td>")
            if n == 0:
                first.append((name, view, zoom))
        metrics_line = ", ".join(
            f"{m}: {_fmt(_num(by[(m, image)].get(cfg.fidelity)), cfg.fidelity)}" for m in models
            if _num(by[(m, image)].get(cfg.fidelity)) is not None)
        caption = f"{html.escape(image)} (zoom: {box[2]}x{box[2]} HR px at y={box[0]}, x={box[1]})"
        if metrics_line:
            caption += f"; {html.escape(cfg.fidelity)}: {html.escape(metrics_line)}"
        parts.append(f"<figure><table class='grid'><tr>{''.join(heads)}</tr><tr>{''.join(views)}</tr>"
                     f"<tr>{''.join(zooms)}</tr></table><figcaption>{caption}</figcaption></figure>")
    return "".join(parts), first


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table.metrics{border-collapse:collapse;font-size:14px} table.metrics td,table.metrics th{border:1px solid #ccc;
padding:4px 10px;text-align:right} table.metrics th.model{text-align:left} table.metrics thead th{background:#f3f3f3}
table.grid{border-collapse:collapse;table-layout:fixed;width:100%} table.grid td,table.grid th{padding:2px;
font-size:13px;text-align:center} table.grid img{max-width:100%;height:auto}
img.zoom{image-rendering:pixelated;image-rendering:crisp-edges} figure{margin:0 0 18px 0}
figcaption{font-size:12px;color:#555} .na{color:#a33} .small{font-size:12px;color:#555} img{vertical-align:top}
"""


def render(job: ReportJob) -> tuple[Path, Path, Page]:
    """Write report.html (+ report_files/) and report.png; returns their paths and what was gathered."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("oars-fast report needs matplotlib: pip install matplotlib") from None
    cfg = job.report
    page = gather(job)
    out = Path(cfg.output).expanduser() if cfg.output else page.run_root / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, cfg.embed)
    sections = []
    summary = page.summary
    tradeoff = None
    first_row: list[tuple[str, Image.Image, Image.Image]] = []
    # 1. metrics
    if summary is not None:
        s = summary.get("settings", {})
        settings = ", ".join(f"{k} {s[k]}" for k in ("benchmark", "n_images", "scale", "crop", "crop_border",
                                                     "sampler_steps", "device", "created") if k in s)
        skipped = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
                          for k, v in summary.get("skipped", {}).items())
        extra = "".join(f"<li>{html.escape(n)}: {len(m['missing'])} image(s) without output</li>"
                        for n, m in summary["models"].items() if m.get("missing"))
        sections.append(f"<h2>Metrics</h2><p class='small'>{html.escape(settings)}; "
                        f"{html.escape(str(s.get('layout', '')))}</p>{_metric_table(summary)}"
                        + (f"<p>Skipped metrics (not available):</p><ul class='na'>{skipped}</ul>" if skipped else "")
                        + (f"<ul class='na'>{extra}</ul>" if extra else ""))
        # 2. trade-off
        axes = _tradeoff_axes(summary, cfg)
        if isinstance(axes, str):
            page.notes.append(f"perception-fidelity trade-off: not available: {axes}")
        else:
            tradeoff = axes
            fig, ax = plt.subplots(figsize=(5.2, 3.8))
            _plot_tradeoff(plt, ax, summary, *axes)
            fig.tight_layout()
            sections.append(f"<h2>Perception-fidelity trade-off</h2><img src='{writer.png('tradeoff.png', fig=fig)}' "
                            f"alt='trade-off {axes[1]} vs {axes[0]}'>")
            plt.close(fig)
        # 3. examples
        body, first_row = _examples(page, cfg, writer)
        if body:
            sections.append("<h2>Examples</h2><p class='small'>Each image with the box of its highest-gradient region "
                            "(red); below, that box enlarged with nearest-neighbour (real pixels).</p>" + body)
    # 4. curves
    shown = [c for c in page.curves if any(k in c.series for _, keys in PANELS for k in keys)]
    if shown:
        imgs = []
        for i, c in enumerate(shown):
            fig = _plot_curves(plt, c)
            imgs.append(f"<figure><img src='{writer.png(f'curves_{i}.png', fig=fig)}' alt='curves {c.stage}'>"
                        f"<figcaption>{html.escape(str(c.file))}</figcaption></figure>")
            plt.close(fig)
        sections.append("<h2>Training curves</h2>" + "".join(imgs))
    # 5. stage samples
    if page.samples:
        imgs = []
        for i, (stage, p) in enumerate(page.samples):
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    im.load()
            except OSError as e:
                page.notes.append(f"samples of {stage}: not available: {p} cannot be read ({e})")
                continue
            imgs.append(f"<figure><img class='zoom' src='{writer.png(f'samples_{i}.png', im)}' "
                        f"alt='samples {stage}' width='{min(im.width * 2, 1200)}'><figcaption>{html.escape(stage)}: "
                        f"{html.escape(p.name)}</figcaption></figure>")
        if imgs:
            sections.append("<h2>Stage samples (newest grid per stage)</h2>" + "".join(imgs))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in page.notes)
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(page.title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(page.title)}</h1>"
           f"<p class='small'>run folder {html.escape(str(page.run_root.resolve()))}; eval "
           f"{html.escape(str(page.eval_dir.resolve()))}; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
           + "".join(sections)
           + (f"<h2>Not available</h2><ul class='na'>{notes}</ul>" if notes else "")
           + "</body></html>")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    png = out.with_suffix(".png")
    _summary_png(plt, png, page, tradeoff, first_row, shown)
    return out, png, page


def _summary_png(plt, path: Path, page: Page, tradeoff, first_row, curves: list[Curves]) -> None:
    """report.png: metric table, trade-off, the first example row, one curve panel per stage."""
    from matplotlib.gridspec import GridSpec

    summary = page.summary
    n_curves = len(curves)
    rows = 1 + (1 if first_row else 0) + (1 if n_curves else 0)
    fig = plt.figure(figsize=(13, 3.6 * rows + 0.6))
    gs = GridSpec(rows, 2, figure=fig, width_ratios=[1.5, 1])
    fig.suptitle(page.title, fontsize=13)
    r = 0
    ax = fig.add_subplot(gs[r, 0])
    ax.axis("off")
    if summary is not None and _metric_cols(summary):
        cols = _metric_cols(summary)
        cells = [[_fmt(m["mean"].get(c), c) for c in cols] for m in summary["models"].values()]
        t = ax.table(cellText=cells, rowLabels=list(summary["models"]),
                     colLabels=[summary["metrics"][c].get("label", c) + _arrow(summary["metrics"][c]) for c in cols],
                     loc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.auto_set_column_width(list(range(-1, len(cols))))  # headers like "COMPASS R ↑" fit their column
        t.scale(1, 1.4)
        ax.set_title("eval means", fontsize=10)
    else:
        ax.text(0.0, 0.5, "metrics: not available (no eval output)", fontsize=11, color="#a33")
    ax = fig.add_subplot(gs[r, 1])
    if tradeoff is not None:
        _plot_tradeoff(plt, ax, summary, *tradeoff)
    else:
        ax.axis("off")
        ax.text(0.0, 0.5, "trade-off: not available", fontsize=11, color="#a33")
    r += 1
    if first_row:
        ax = fig.add_subplot(gs[r, :])
        gap = np.full((first_row[0][1].height + first_row[0][2].height, 6, 3), 255, np.uint8)
        strip = np.concatenate([np.concatenate([np.concatenate([np.asarray(v), np.asarray(z)], axis=0), gap], axis=1)
                                for _, v, z in first_row], axis=1)
        ax.imshow(strip, interpolation="nearest")
        ax.axis("off")
        ax.set_title(" | ".join(name for name, _, _ in first_row) + "  (first example; the box enlarged below)",
                     fontsize=10)
        r += 1
    if n_curves:
        sub = gs[r, :].subgridspec(1, n_curves)
        for i, c in enumerate(curves):
            ax = fig.add_subplot(sub[0, i])
            title, keys = next((t, [k for k in ks if k in c.series]) for t, ks in sorted(PANELS, key=_summary_rank)
                               if any(k in c.series for k in ks))
            for j, k in enumerate(keys):
                steps, vals = c.series[k]
                ax.plot(steps, _smooth(vals), lw=1.3, color=plt.cm.tab10(j), label=k)
            ax.set_title(f"{c.stage}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(job: ReportJob) -> int:
    out, png, page = render(job)
    n_models = len(page.summary["models"]) if page.summary else 0
    parts = [f"report: {out} ({n_models} model(s), {len(page.curves)} step log(s)); summary figure {png}"]
    parts += [f"report: {n}" for n in page.notes]
    print("\n".join(parts))
    return 0
