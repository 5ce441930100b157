"""DALI loader (CPU pipelines here): shapes, LR/HR alignment, sharding, bad files, resume, fallback."""
import logging

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from oars_fast.config import DataConfig
from oars_fast.data import build as build_mod
from oars_fast.data import dali as dali_mod
from oars_fast.data.build import build_dataset, build_loader
from oars_fast.data.loader import ShardedLoader

pytest.importorskip("nvidia.dali")


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"loader": "dali", "num_workers": 2, **kw})


def _paired_dir(tmp_path, n=6, s=4):
    """LR = exact s x s block mean of HR (rounded), so any aligned crop satisfies lr == pool(hr)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 16 * (3 + i % 3), 16 * (4 + i % 2)
        hr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lr = hr.reshape(h // s, s, w // s, s, 3).astype(np.float64).mean((1, 3)).round().astype(np.uint8)
        (tmp_path / "hr").mkdir(exist_ok=True)
        (tmp_path / "lr").mkdir(exist_ok=True)
        Image.fromarray(hr).save(tmp_path / "hr" / f"p{i}.png")
        Image.fromarray(lr).save(tmp_path / "lr" / f"p{i}.png")
    return _cfg(source="paired", hr_dir=str(tmp_path / "hr"), lr_dir=str(tmp_path / "lr"), crop_size=32)


def test_paired_crops_are_aligned_and_equal_to_the_torch_loader(tmp_path):
    cfg = _paired_dir(tmp_path)
    ds = build_dataset(cfg, seed=3)
    loader = build_loader(ds, cfg, 3, seed=3)
    assert isinstance(loader, dali_mod.DALILoader)
    ref = iter(ShardedLoader(ds, 3, seed=3))
    it = iter(loader)
    for _ in range(5):  # crosses an epoch boundary (6 files, batches of 3)
        b, r = next(it), next(ref)
        assert b["hr"].shape == (3, 3, 32, 32) and b["lr"].shape == (3, 3, 8, 8) and b["hr"].dtype == torch.float32
        pooled = torch.nn.functional.avg_pool2d(b["hr"] * 255, 4)
        assert torch.equal(pooled.round(), (b["lr"] * 255).round())  # aligned windows, flips alike
        assert torch.equal(b["hr"], r["hr"]) and torch.equal(b["lr"], r["lr"])  # the same crops (PNG)
        assert torch.equal(b["index"], r["index"]) and torch.equal(b["seed"], r["seed"])


def test_hr_and_lq_shapes(tmp_path, image_dir):
    for source, key, side in (("hr", "hr", 32), ("lq", "lr", 8)):
        kw = {"hr_dir": str(image_dir)} if source == "hr" else {"lq_dir": str(image_dir)}
        cfg = _cfg(source=source, crop_size=32, **kw)
        b = next(iter(build_loader(build_dataset(cfg, 0), cfg, 2, 0)))
        assert b[key].shape == (2, 3, side, side) and 0 <= float(b[key].min()) and float(b[key].max()) <= 1


def test_sharding_covers_the_set_once_per_epoch(tmp_path):
    for i in range(12):
        write_image(tmp_path / "hr" / f"{i:02d}.png", 40, 40, seed=i)
    cfg = _cfg(source="hr", hr_dir=str(tmp_path / "hr"), crop_size=32)
    ds = build_dataset(cfg, 0)
    seen = []
    for rank in range(2):
        loader = build_loader(ds, cfg, 3, 0, rank=rank, world=2)
        it = iter(loader)
        per_epoch = loader.batches_per_epoch()
        assert per_epoch == 2
        seen += [i for _ in range(per_epoch) for i in next(it)["index"].tolist()]
    assert sorted(seen) == list(range(12))


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    d = tmp_path / "hr"
    for i in range(6):
        write_image(d / f"{i}.png", 40, 40, seed=i)
    (d / "2.png").write_bytes(b"not an image at all")
    data = (d / "4.png").read_bytes()
    (d / "4.png").write_bytes(data[: len(data) // 3])  # truncated
    cfg = _cfg(source="hr", hr_dir=str(d), crop_size=32)
    loader = build_loader(build_dataset(cfg, 0), cfg, 2, 0)
    it = iter(loader)
    with caplog.at_level(logging.WARNING):
        paths = [p for _ in range(6) for p in next(it)["path"]]  # two epochs
    assert loader.skipped_files == {str(d / "2.png"), str(d / "4.png")}
    assert not any(p.endswith(("2.png", "4.png")) for p in paths)
    assert "skipped" in caplog.text


def test_files_dali_cannot_decode_are_skipped_mid_epoch(tmp_path):
    """JPEGs whose header is fine but whose data is not: the pipeline fails, the file is found, skipped,
    and the loader goes on (no crash, every later batch made of good files)."""
    d = tmp_path / "hr"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    data = (d / "3.jpg").read_bytes()
    (d / "3.jpg").write_bytes(data[: len(data) // 2])  # truncated: DALI names the file in its error
    data = (d / "4.jpg").read_bytes()
    (d / "4.jpg").write_bytes(data[:200] + b"\0" * 50 + data[250:])  # corrupt markers: DALI does not name it
    cfg = _cfg(source="hr", hr_dir=str(d), crop_size=32)
    loader = build_loader(build_dataset(cfg, 0), cfg, 2, 0)
    it = iter(loader)
    paths = [p for _ in range(6) for p in next(it)["path"]]
    assert loader.skipped_files == {str(d / "3.jpg"), str(d / "4.jpg")}
    assert not any(p.endswith(("3.jpg", "4.jpg")) for p in paths)


def test_resume_continues_with_the_same_batches(tmp_path, image_dir):
    cfg = _cfg(source="hr", hr_dir=str(image_dir), crop_size=32)
    ds = build_dataset(cfg, 7)
    full = iter(build_loader(ds, cfg, 2, 7))
    ref = [next(full)["hr"] for _ in range(5)]
    cut = build_loader(ds, cfg, 2, 7)
    it = iter(cut)
    next(it), next(it)
    again = build_loader(ds, cfg, 2, 7)
    again.load_state_dict(cut.state_dict())
    it2 = iter(again)
    for k in range(2, 5):
        assert torch.equal(next(it2)["hr"], ref[k])


def test_falls_back_to_torch_loader_when_dali_is_missing(tmp_path, image_dir, monkeypatch, caplog):
    monkeypatch.setattr(build_mod, "dali_unavailable", lambda: "NVIDIA DALI is not installed (test)")
    cfg = _cfg(source="hr", hr_dir=str(image_dir), crop_size=32)
    with caplog.at_level(logging.WARNING):
        loader = build_loader(build_dataset(cfg, 0), cfg, 2, 0)
    assert type(loader) is ShardedLoader and "using the torch loader instead" in caplog.text


def test_small_images_are_padded_or_skipped(tmp_path):
    d = tmp_path / "hr"
    write_image(d / "big.png", 48, 48, seed=1)
    write_image(d / "small.png", 20, 24, seed=2)
    cfg = _cfg(source="hr", hr_dir=str(d), crop_size=32, flip=False)
    b = next(iter(build_loader(build_dataset(cfg, 0), cfg, 2, 0)))
    assert b["hr"].shape == (2, 3, 32, 32)
    small = b["hr"][[p.endswith("small.png") for p in b["path"]].index(True)]
    assert float(small[:, 20:, :].abs().max()) == 0.0  # zero padding below the 20-row image (documented)
    skip = _cfg(source="hr", hr_dir=str(d), crop_size=32, small_image="skip")
    loader = build_loader(build_dataset(skip, 0), skip, 2, 0)
    assert all(p.endswith("big.png") for p in next(iter(loader))["path"])
    assert loader.skipped_files == {str(d / "small.png")}


def test_pipelines_per_chunk_give_the_same_batches(tmp_path, image_dir):
    cfg = _cfg(source="hr", hr_dir=str(image_dir), crop_size=32)
    ds = build_dataset(cfg, 5)
    whole = iter(build_loader(ds, cfg, 2, 5))
    from oars_fast.data.dali import DALILoader

    chunked = iter(DALILoader(ds, 2, 5, num_threads=1, chunk=2))  # 3 batches an epoch: pipelines of 2 and 1
    for _ in range(7):
        a, b = next(whole), next(chunked)
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["index"], b["index"])
