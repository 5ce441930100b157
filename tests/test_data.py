import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_image
from PIL import Image

from oars_fast.config import DataConfig
from oars_fast.data.build import build_dataset
from oars_fast.data.datasets import HRDataset, LQDataset, PairedDataset, collate, match_pairs, reflect_pad_to
from oars_fast.data.demo import demo_dataset_dir
from oars_fast.data.images import ImageReadError, load_image, scan_images
from oars_fast.data.loader import ShardedLoader
from oars_fast.errors import UserError


def test_formats_and_conversions(tmp_path):
    for ext in ("png", "jpg", "webp", "bmp", "tiff"):
        write_image(tmp_path / f"a.{ext}", 20, 30)
    write_image(tmp_path / "sub" / "gray.png", 20, 30, mode="L")
    write_image(tmp_path / "sub" / "rgba.png", 20, 30, mode="RGBA")
    write_image(tmp_path / "sub" / "deep.png", 20, 30, mode="I;16")
    files = scan_images(tmp_path)
    assert len(files) == 8  # recursive
    for f in files:
        img = load_image(f)
        assert img.shape == (3, 20, 30) and img.dtype == torch.float32
        assert 0 <= img.min() and img.max() <= 1
    deep = load_image(tmp_path / "sub" / "deep.png")
    gray = load_image(tmp_path / "sub" / "gray.png")
    assert torch.allclose(deep, gray, atol=1e-6)  # 16-bit scaled to [0, 1] like its 8-bit twin
    assert torch.equal(deep[0], deep[1])


def _bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    good = write_image(folder / "good.png", 40, 40)
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "notanimage.jpg").write_bytes(b"this is not a jpeg")
    (folder / "empty.webp").write_bytes(b"")


def test_unreadable_files_raise_with_name(tmp_path):
    _bad_files(tmp_path)
    for name in ("truncated.png", "notanimage.jpg", "empty.webp"):
        with pytest.raises(ImageReadError, match=name):
            load_image(tmp_path / name)


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    _bad_files(tmp_path / "hr")
    cfg = DataConfig(source="hr", hr_dir=str(tmp_path / "hr"), crop_size=16, batch_size=4)
    ds = build_dataset(cfg, seed=0)
    assert len(ds) == 4
    loader = ShardedLoader(ds, micro_batch=4, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader))
    assert batch["hr"].shape == (4, 3, 16, 16)
    assert sorted(set(p.split("/")[-1] for p in batch["skipped"])) == ["empty.webp", "notanimage.jpg", "truncated.png"]
    assert loader.skipped_total == 3  # each unusable file counted once
    assert "truncated.png" in caplog.text
    assert all(p.endswith("good.png") for p in batch["path"])


def test_all_bad_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    ds = HRDataset(scan_images(tmp_path), DataConfig(source="hr", hr_dir=str(tmp_path), crop_size=16), 0)
    with pytest.raises(UserError, match="no usable image"):
        ds[0]


def test_empty_or_missing_folder_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="empty"):
        build_dataset(DataConfig(source="hr", hr_dir=str(tmp_path / "empty")), 0)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_dataset(DataConfig(source="lq", lq_dir=str(tmp_path / "missing")), 0)


def test_small_images_pad_or_skip(tmp_path):
    write_image(tmp_path / "small.png", 10, 13)
    write_image(tmp_path / "big.png", 64, 64)
    files = scan_images(tmp_path)
    padded = HRDataset(files, DataConfig(source="hr", hr_dir=str(tmp_path), crop_size=32), 0)
    s = padded[files.index(tmp_path / "small.png")]
    assert s["hr"].shape == (3, 32, 32) and not s["skipped"]
    skipping = HRDataset(files, DataConfig(source="hr", hr_dir=str(tmp_path), crop_size=32, small_image="skip"), 0)
    s = skipping[files.index(tmp_path / "small.png")]
    assert s["path"].endswith("big.png") and s["skipped"][0].endswith("small.png")


def test_reflect_pad_handles_tiny_and_large_factors():
    img = torch.arange(6.0).view(1, 2, 3)
    out = reflect_pad_to(img, 17, 19)
    assert out.shape == (1, 17, 19)
    assert torch.equal(out[:, :2, :3], img)
    one = reflect_pad_to(torch.ones(3, 1, 1), 4, 4)
    assert one.shape == (3, 4, 4)


def _paired(tmp_path, n=4, scale=4):
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = (rng.random((48 + 8 * i, 64, 3)) * 255).astype(np.uint8)
        t = torch.from_numpy(hr).permute(2, 0, 1).float()[None] / 255
        lr = F.avg_pool2d(t, scale)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
        (tmp_path / "hr").mkdir(exist_ok=True)
        (tmp_path / "lr").mkdir(exist_ok=True)
        Image.fromarray(hr).save(tmp_path / "hr" / f"p{i}.png")
        Image.fromarray(lr).save(tmp_path / "lr" / f"p{i}.png")
    Image.fromarray(hr).save(tmp_path / "hr" / "orphan.png")


def test_paired_crops_are_aligned(tmp_path):
    _paired(tmp_path)
    pairs = match_pairs(tmp_path / "lr", tmp_path / "hr")
    assert len(pairs) == 4
    ds = PairedDataset(pairs, DataConfig(source="paired", lr_dir=str(tmp_path / "lr"), hr_dir=str(tmp_path / "hr"),
                                         crop_size=32, flip=True), seed=3)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["lr"].shape == (3, 8, 8) and s["hr"].shape == (3, 32, 32)
            # the LR was made by 4x4 averaging: the aligned HR crop must average to it (8-bit rounding)
            assert (F.avg_pool2d(s["hr"][None], 4)[0] - s["lr"]).abs().max() <= 0.5 / 255 + 1e-6


def test_paired_size_mismatch_is_skipped(tmp_path):
    _paired(tmp_path, n=2)
    write_image(tmp_path / "lr" / "p1.png", 10, 10)  # now 4x does not match its HR
    ds = PairedDataset(match_pairs(tmp_path / "lr", tmp_path / "hr"),
                       DataConfig(source="paired", lr_dir="x", hr_dir="y", crop_size=16), 0)
    s = ds[1]
    assert s["skipped"] and "p1" in s["skipped"][0]


def test_lq_crops(tmp_path, image_dir):
    ds = LQDataset(scan_images(image_dir), DataConfig(source="lq", lq_dir=str(image_dir), crop_size=64), 0)
    assert ds[0]["lr"].shape == (3, 16, 16) and "hr" not in ds[0]


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_any_worker_count(image_dir):
    cfg = DataConfig(source="hr", hr_dir=str(image_dir), crop_size=32, batch_size=2)
    a = _batches(ShardedLoader(build_dataset(cfg, 7), 2, seed=7, num_workers=0), 5)
    b = _batches(ShardedLoader(build_dataset(cfg, 7), 2, seed=7, num_workers=2), 5)
    c = _batches(ShardedLoader(build_dataset(cfg, 8), 2, seed=8, num_workers=0), 5)
    for x, y in zip(a, b):
        assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["index"], y["index"])
    assert not all(torch.equal(x["hr"], z["hr"]) for x, z in zip(a, c))


def test_sharding_splits_the_global_batch(image_dir):
    cfg = DataConfig(source="hr", hr_dir=str(image_dir), crop_size=32)
    single = _batches(ShardedLoader(build_dataset(cfg, 1), 2, seed=1, world=1), 3)  # 6 = one epoch
    ranks = [_batches(ShardedLoader(build_dataset(cfg, 1), 1, seed=1, rank=r, world=2), 3) for r in range(2)]
    seen_single = sorted(int(i) for b in single for i in b["index"])
    seen_ranks = sorted(int(i) for r in ranks for b in r for i in b["index"])
    assert seen_single == seen_ranks == list(range(6))  # each sample once per epoch, across ranks


def test_loader_resume_continues_exactly(image_dir):
    cfg = DataConfig(source="hr", hr_dir=str(image_dir), crop_size=32)
    full = _batches(ShardedLoader(build_dataset(cfg, 2), 2, seed=2), 7)
    first = ShardedLoader(build_dataset(cfg, 2), 2, seed=2)
    _batches(first, 4)
    resumed = ShardedLoader(build_dataset(cfg, 2), 2, seed=2)
    resumed.load_state_dict(first.state_dict())
    rest = _batches(resumed, 3)
    for x, y in zip(full[4:], rest):
        assert torch.equal(x["hr"], y["hr"])


def test_demo_set_built_once(tmp_path):
    root = demo_dataset_dir(tmp_path, patch=128)
    train, val = scan_images(root / "train"), scan_images(root / "val")
    assert len(train) > 50 and len(val) > 5
    assert not {p.name for p in train} & {p.name for p in val}
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert demo_dataset_dir(tmp_path, patch=128) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert load_image(train[0]).shape == (3, 128, 128)


def test_collate_keeps_skips():
    s = [{"hr": torch.zeros(3, 4, 4), "index": i, "seed": 7 * i, "path": f"{i}", "skipped": [f"bad{i}"] * i}
         for i in range(3)]
    b = collate(s)
    assert b["hr"].shape == (3, 3, 4, 4) and b["skipped"] == ["bad1", "bad2", "bad2"]
