"""NVIDIA DALI data loading (``data.loader=dali``): read, decode, crop and flip off the Python workers.

The loader keeps the torch loader's contract (:class:`~oars_fast.data.loader.ShardedLoader`):

* the same epoch permutation and per-rank sharding (rank ``k`` of ``W`` takes positions ``k, k + W,
  ...`` of the epoch's permutation, whole batches only), so the ranks together read the data set
  exactly once per epoch, and the same resumable ``state_dict`` (epoch, batches consumed);
* the same batch dict: ``hr`` / ``lr`` float tensors in [0, 1], (B, 3, h, w), ``index``, ``seed``
  (the sample's seed for the on-device degradation and noise, from the data set, so it does not
  depend on the loader), ``path``, ``skipped``;
* unusable files (unreadable, or smaller than the crop with ``small_image=skip``) are found by a
  header check before an epoch's pipeline is built, skipped, counted once and named in the log, and
  replaced by the next usable file, as the torch loader does; a file that passes the header check but
  fails in DALI's decoder (a truncated or corrupt JPEG) stops the pipeline, is identified (from
  DALI's message, else by decoding the pending files one at a time), marked unusable, and the
  pipeline is rebuilt from the same batch.

For each chunk of up to ``chunk`` (256) batches of an epoch, one DALI pipeline is built from this rank's
file list: ``fn.readers.file`` (the list in order, no reader shuffling: the order is the permutation's),
``fn.decoders.image`` (``device="mixed"`` on a GPU: nvJPEG; ``"cpu"`` otherwise), crops whose LR and
HR windows are aligned exactly (integer LR offset, HR offset = scale x LR offset), flips applied alike,
and the output through the DALI PyTorch iterator (on the GPU when decoding there). The crop offsets and
flips are the data set's own per-sample draws (:meth:`~oars_fast.data.datasets.CropDataset.plan`, fed through
``fn.external_source``), so DALI cuts the same crops as the torch loader: the batches agree up to
the JPEG decoder (identical for PNG), and a resumed epoch continues with the same crops.
Deviation: an image smaller than the crop with ``small_image=pad`` is padded with zeros here (the
torch loader reflects).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .datasets import CropDataset
from .loader import LoaderState, ShardedLoader

log = logging.getLogger(__name__)


def dali_unavailable() -> str | None:
    """Why DALI cannot be used here (None: it can)."""
    try:  # optional and heavy: probed, not imported at module load
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except ImportError as e:
        return f"NVIDIA DALI is not installed ({e}); `pip install -e .[dali]` installs it"
    return None


def _header_size(path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the file is not a readable image."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001  (any PIL failure means: unusable)
        return None


def _dali_decodes(path: str) -> bool:
    """Whether DALI's CPU decoder reads `path` (a one-file pipeline; used only after a failure)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one():
        data, _ = fn.readers.file(files=[path])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    try:
        pipe = one()
        pipe.build()
        pipe.run()
        return True
    except Exception:  # noqa: BLE001
        return False


class DALILoader(ShardedLoader):
    """Endless, resumable iterator of per-rank batches decoded by DALI (see the module docstring)."""

    def __init__(self, dataset: CropDataset, micro_batch: int, seed: int, rank: int = 0, world: int = 1,
                 num_threads: int = 2, device_id: int | None = None, chunk: int = 256):
        super().__init__(dataset, micro_batch, seed, rank, world)
        self.num_threads, self.chunk = num_threads, chunk  # chunk: batches per pipeline
        self.device_id = device_id  # a GPU: nvJPEG decode and GPU outputs; None: CPU pipeline
        self._usable: dict[int, bool] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        self.keys = dataset.keys

    # ------------------------------------------------------------------------------------------
    def _check(self, i: int) -> bool:
        """Whether file `i` can be used (header readable; big enough with small_image=skip). Cached."""
        if i not in self._usable:
            cfg = self.dataset.cfg
            sizes = [_header_size(p) for p in self.dataset.paths(i)]
            ok = all(sz is not None for sz in sizes)
            if ok:
                self._sizes[i] = (sizes[0][1], sizes[0][0])  # (height, width) of the first image
            if ok and cfg.small_image == "skip":
                need = cfg.crop_size // cfg.scale if self.keys[0] == "lr" else cfg.crop_size
                w, h = sizes[0]
                ok = min(w, h) >= need
            if ok and len(sizes) == 2:  # paired: HR must be scale x LR
                (lw, lh), (hw, hh) = sizes
                ok = (hw, hh) == (lw * cfg.scale, lh * cfg.scale)
            self._usable[i] = ok
        return self._usable[i]

    def _resolve(self, index: int) -> tuple[int, list[str]]:
        """The usable file standing in for `index` (the next usable one) and the skipped names."""
        n = len(self.dataset)
        skipped = []
        for attempt in range(n):
            i = (index + attempt) % n
            if self._check(i):
                return i, skipped
            skipped.append(self.dataset.display_name(i))
        raise UserError(f"no usable image among the {n} files of this data set (first: {skipped[:3]})")

    def _pipeline(self, files: list[list[str]], plans: list[np.ndarray]):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.dataset.cfg
        s, c = cfg.scale, cfg.crop_size
        gpu = self.device_id is not None
        batches = [plans[i:i + self.micro_batch] for i in range(0, len(plans), self.micro_batch)]

        @pipeline_def(batch_size=self.micro_batch, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=2)
        def pipe():
            encoded = [fn.readers.file(files=lst, random_shuffle=False, name=f"reader_{key}")[0]
                       for key, lst in zip(self.keys, files)]
            # per-sample (y, x, hflip, vflip) on the first image's grid, the draws the torch loader makes
            plan = fn.external_source(source=iter(batches), batch=True, dtype=types.INT32, cycle=False)
            ys, xs, hflip, vflip = plan[0], plan[1], plan[2], plan[3]
            outs = []
            for key, data in zip(self.keys, encoded):
                # EXIF orientation is not applied, as in the torch loader (and the header sizes the crops use)
                img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                        adjust_orientation=False)
                f = s if (key == "hr" and self.keys[0] == "lr") else 1  # HR offset = scale x LR offset
                side = c if key == "hr" else c // s
                # start/shape as argument inputs: host-side values, valid for a GPU (mixed-decoded) image too
                img = fn.slice(img, start=fn.stack(ys * f, xs * f), shape=[side, side], axes=[0, 1],
                               out_of_bounds_policy="pad", fill_values=0)
                img = fn.flip(img, horizontal=hflip, vertical=vflip)
                outs.append(fn.transpose(img, perm=[2, 0, 1]))
            return tuple(outs)

        return pipe()

    # ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        while True:
            epoch = self.state.epoch
            self.dataset.set_epoch(epoch)
            batches = self._epoch_batches(epoch)[self.state.batch:]
            if not batches:
                self.state = LoaderState(epoch=epoch + 1, batch=0)
                continue
            # one pipeline per chunk of batches: the header checks of a chunk, not of a whole epoch,
            # stand between a start (or resume) and the first batch
            resolved = [[self._resolve(i) for i in b] for b in batches[:self.chunk]]
            order = [i for b in resolved for i, _ in b]
            files = [[str(self.dataset.paths(i)[k]) for i in order] for k in range(len(self.keys))]
            plans = [np.array(self.dataset.plan(i, *self._sizes[i]), dtype=np.int32) for i in order]
            start = self.state.batch
            try:
                pipe = self._pipeline(files, plans)
                pipe.build()
                it = DALIGenericIterator(pipe, list(self.keys), reader_name=f"reader_{self.keys[0]}",
                                         last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
                yield from self._batches(resolved, it)
            except Exception as e:  # noqa: BLE001  (DALI raises a plain RuntimeError for a decode failure)
                done = self.state.batch - start
                self._mark_undecodable(e, resolved[done:done + 3])  # the failing batch is among the next 3
                # the loop rebuilds the pipeline from the current batch, without the file

    def _mark_undecodable(self, error: Exception, batches: list[list[tuple[int, list[str]]]]) -> None:
        """A file passed the header check but DALI could not decode it (e.g. a truncated JPEG): find it
        (named in DALI's message, else by decoding each file of `batches` alone with DALI), mark it
        unusable; re-raise the error if no file is to blame."""
        pending = [i for b in batches for i, _ in b]
        paths = {i: [str(p) for p in self.dataset.paths(i)] for i in pending}
        msg = str(error)
        bad = [i for i in pending if any(f in msg for f in paths[i])]
        if not bad:
            bad = [i for i in pending if not all(_dali_decodes(f) for f in paths[i])]
        if not bad:
            raise error
        for i in sorted(set(bad)):  # a replacement file can stand in twice
            self._usable[i] = False
            log.warning("DALI could not decode %s: skipped from now on", self.dataset.display_name(i))

    def _batches(self, resolved, it) -> Iterator[dict]:
        """The batches of one pipeline, as dicts like the torch loader's."""
        for b, (out,) in zip(resolved, it):
            self.state.batch += 1
            skipped = [p for _, sk in b for p in sk]
            self.note_skipped(skipped)
            batch = {k: out[k].float().div_(255) for k in self.keys}
            idx = [i for i, _ in b]
            batch["index"] = torch.tensor(idx)
            batch["seed"] = torch.tensor([self.dataset.sample_seed(i) for i in idx], dtype=torch.int64)
            batch["path"] = [self.dataset.display_name(i) for i in idx]
            batch["skipped"] = skipped
            yield batch
