"""Crash-safe persistent cache of annotation scores (MLLM calls are slow; a rerun must not repeat them).

Format: append-only JSONL, one record ``{"k": <sha1 hex of the key parts>, "v": <JSON value>}`` per line. Every
record is written with a single ``write`` + ``flush`` and, by default, ``os.fsync``: when :meth:`put` or
:meth:`ScoreCache.get_or_compute` returns, the record is on disk (``fsync=False``: it survives a killed process,
not a power cut). A crash can therefore only tear the last line; on open a torn tail (bytes after the last
newline) is cut off with a warning, and a line that does not parse is skipped with a warning naming the file
and line. Later records win over earlier ones with the same key. One writer per file (per rank: one file each).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def _feed(h: Any, part: Any) -> None:
    """Feed one key part into a hash, type-tagged and length-prefixed (so different parts never collide)."""
    def blob(tag: bytes, data: bytes) -> None:
        h.update(tag + struct.pack("<Q", len(data)) + data)

    if part is None:
        blob(b"N", b"")
    elif isinstance(part, bool):
        blob(b"B", b"1" if part else b"0")
    elif isinstance(part, int):
        blob(b"I", str(part).encode())
    elif isinstance(part, float):
        blob(b"F", part.hex().encode())
    elif isinstance(part, str):
        blob(b"S", part.encode("utf-8"))
    elif isinstance(part, (bytes, bytearray, memoryview)):
        blob(b"Y", bytes(part))
    elif isinstance(part, torch.Tensor):
        t = part.detach().cpu()
        try:
            a = t.numpy()  # numpy, not torch, makes the contiguous copy: faster on shared cores
        except TypeError:  # bfloat16 & co: hash the raw bits
            a = t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
                t.element_size()]).numpy()
        blob(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        blob(b"D", np.ascontiguousarray(a).tobytes())
    elif isinstance(part, np.ndarray):
        a = np.ascontiguousarray(part)
        blob(b"A", f"{a.dtype.str}{a.shape}".encode())
        blob(b"D", a.tobytes())
    elif isinstance(part, Image.Image):
        blob(b"P", part.mode.encode())
        _feed(h, np.asarray(part))
    elif isinstance(part, (list, tuple)):
        blob(b"L", str(len(part)).encode())
        for p in part:
            _feed(h, p)
    else:
        raise TypeError(f"cannot hash a key part of type {type(part).__name__}; use str, bytes, numbers, None, "
                        "torch tensors, numpy arrays, PIL images or lists of them")


def cache_key(key_parts: Sequence[Any]) -> str:
    """SHA-1 hex digest of the key parts, e.g. ``(scorer.name, image)`` or ``(comparator.name, lr, a, b)``.

    Tensors and arrays are hashed exactly: dtype, shape and raw bytes (a float image and its uint8 version are
    different keys; hash what you score). Strings carry the scorer's name and settings.
    """
    if isinstance(key_parts, (str, bytes)) or not isinstance(key_parts, Sequence):
        raise TypeError("key_parts must be a sequence (list or tuple) of parts, e.g. (scorer.name, image)")
    h = hashlib.sha1()
    _feed(h, list(key_parts))
    return h.hexdigest()


class ScoreCache:
    """Persistent ``key parts -> JSON value`` map on an append-only JSONL file (see the module docstring).

    ``hits`` and ``misses`` count :meth:`get_or_compute` (and :func:`cached_scores`) look-ups; ``skipped_lines``
    the lines of the file that could not be read back.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.hits = self.misses = self.skipped_lines = 0
        self._data: dict[str, Any] = {}
        self._fh: Any = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a torn last record (the process died mid-write): cut it off
            warnings.warn(f"{self.path}: ignoring a torn last line ({len(raw) - end} bytes, an interrupted write)",
                          RuntimeWarning, stacklevel=3)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
            raw = raw[:end]
        for n, line in enumerate(raw.split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._data[rec["k"]] = rec["v"]
            except (ValueError, KeyError, TypeError) as e:
                self.skipped_lines += 1
                warnings.warn(f"{self.path}:{n}: skipping an unreadable cache record ({e})", RuntimeWarning,
                              stacklevel=3)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key_parts: Sequence[Any]) -> bool:
        return cache_key(key_parts) in self._data

    def get(self, key_parts: Sequence[Any], default: Any = None) -> Any:
        return self._data.get(cache_key(key_parts), default)

    def put(self, key_parts: Sequence[Any], value: Any) -> None:
        """Store a JSON-serialisable value (NaN allowed; tuples come back as lists); durable on return."""
        key = cache_key(key_parts)
        try:
            line = json.dumps({"k": key, "v": value}, separators=(",", ":")) + "\n"
        except TypeError as e:
            raise TypeError(f"ScoreCache values must be JSON-serialisable: {e}") from None
        if self._fh is None:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            if new and self.fsync:  # make the new file's directory entry durable too
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        self._fh.write(line)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._data[key] = value

    def get_or_compute(self, key_parts: Sequence[Any], fn: Callable[[], Any]) -> Any:
        """The cached value for these key parts, or ``fn()`` computed, stored (durably) and returned."""
        key = cache_key(key_parts)
        if key in self._data:
            self.hits += 1
            return self._data[key]
        self.misses += 1
        value = fn()
        self.put(key_parts, value)
        return value

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def cached_scores(cache: ScoreCache, scorer: Any, images: Sequence[torch.Tensor]) -> list[float]:
    """``scorer.score(images)`` through the cache: only the images not yet cached are scored, in one call."""
    keys = [(scorer.name, img) for img in images]
    out: list[Any] = [None] * len(images)
    todo = []
    for i, k in enumerate(keys):
        h = cache_key(k)
        if h in cache._data:
            cache.hits += 1
            out[i] = cache._data[h]
        else:
            cache.misses += 1
            todo.append(i)
    if todo:
        values = scorer.score([images[i] for i in todo])
        if len(values) != len(todo):
            raise ValueError(f"{scorer.name}: score() returned {len(values)} values for {len(todo)} images")
        for i, v in zip(todo, values):
            cache.put(keys[i], float(v))
            out[i] = float(v)
    return out


def cached_compare(cache: ScoreCache, comparator: Any, lr: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor) -> str:
    """``comparator.compare(lr, a, b)`` through the cache (the order of A and B is part of the key)."""
    return cache.get_or_compute((comparator.name, "compare", lr, a, b), lambda: comparator.compare(lr, a, b))
