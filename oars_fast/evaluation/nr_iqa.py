"""No-reference image quality metrics (MUSIQ, LIQE, CLIPIQA, MANIQA) through an optional plug-in: pyiqa
(IQA-PyTorch, ``pip install pyiqa``) when it is installed and its weights are available.

:func:`load_nr_metrics` never fails: a metric that cannot be built is returned among the skipped ones with
the reason (pyiqa not installed, weights not in its cache, any error while building it). With
``offline=True`` (the default) downloads are refused while the metrics are built: ``HF_HUB_OFFLINE=1``
for the Hugging Face hub and a urllib opener that refuses http(s) (torch.hub's ``download_url_to_file``,
which pyiqa's ``load_file_from_url`` uses, opens URLs through urllib), so a metric whose weights are not
already in pyiqa's cache (``<torch hub dir>/pyiqa``, usually ``~/.cache/torch/hub/pyiqa``) is skipped
rather than fetched. Place the weight files there (from a machine with network: build the metric once
with pyiqa) to use them offline.

A metric is called on (B, 3, H, W) RGB in [0, 1] and returns (B,) float64 scores; ``higher_is_better``
says which way is better (all four: higher).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NR_METRICS", "NRMetric", "load_nr_metrics", "pyiqa_cache_dir"]

log = logging.getLogger(__name__)

NR_METRICS = {
    "musiq": "MUSIQ (KonIQ-10k), higher is better, ~0-100",
    "liqe": "LIQE (KonIQ-10k-trained CLIP), higher is better, 1-5",
    "clipiqa": "CLIP-IQA, higher is better, 0-1",
    "maniqa": "MANIQA (KonIQ-10k), higher is better, ~0-1",
}
"""The no-reference metrics eval offers, with their pyiqa names (the keys)."""


@dataclass
class NRMetric:
    """A built no-reference metric: ``metric(x)`` with x (B, 3, H, W) in [0, 1] -> (B,) float64."""

    name: str
    model: Any
    higher_is_better: bool = True

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.float().clamp(0, 1))
        return torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(x.shape[0], -1).mean(dim=1)


class _RefuseDownloads(urllib.request.BaseHandler):
    """A urllib handler that refuses every http(s) request (offline mode); it runs before urllib's own."""

    handler_order = 0

    def _refuse(self, req: urllib.request.Request) -> None:
        raise OSError(f"download refused (offline): {req.full_url}")

    http_open = https_open = _refuse


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_opener = getattr(urllib.request, "_opener", None)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    urllib.request.install_opener(urllib.request.build_opener(_RefuseDownloads()))
    try:
        yield
    finally:
        urllib.request.install_opener(saved_opener)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pyiqa_cache_dir() -> str:
    """Where pyiqa looks for (and would download) its weights."""
    return os.path.join(torch.hub.get_dir(), "pyiqa")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def load_nr_metrics(names: list[str], device: torch.device | str = "cpu",
                    offline: bool = True) -> tuple[dict[str, NRMetric], dict[str, str]]:
    """Build the named metrics (keys of :data:`NR_METRICS`) -> (metrics, skipped {name: reason})."""
    metrics: dict[str, NRMetric] = {}
    skipped: dict[str, str] = {}
    names = [n for n in names if n in NR_METRICS]
    if not names:
        return metrics, skipped
    try:
        pyiqa = importlib.import_module("pyiqa")
    except Exception as e:  # ImportError, or a broken installation: the plug-in is optional either way
        reason = ("pyiqa is not installed (optional plug-in: pip install pyiqa; its weights must then be in "
                  f"{pyiqa_cache_dir()} when offline)" if isinstance(e, ImportError) else
                  f"pyiqa cannot be imported ({_short(e)})")
        return metrics, dict.fromkeys(names, reason)
    for name in names:
        try:
            with _offline() if offline else contextlib.nullcontext():
                model = pyiqa.create_metric(name, device=torch.device(device), as_loss=False)
            lower = bool(getattr(model, "lower_better", False))
            metrics[name] = NRMetric(name, model, higher_is_better=not lower)
            log.info("no-reference metric %s: pyiqa %s", name, getattr(pyiqa, "__version__", "?"))
        except Exception as e:  # a plug-in never fails the evaluation: the reason is reported instead
            where = f" (offline: weights must be in {pyiqa_cache_dir()})" if offline else ""
            skipped[name] = f"pyiqa could not build {name}{where}: {_short(e)}"
    return metrics, skipped
