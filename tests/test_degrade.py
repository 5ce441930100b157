import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from oars_fast.config import DegradationConfig, DegradationPass
from oars_fast.data import degrade as D
from oars_fast.data.degrade import RealESRGANDegradation
from oars_fast.data.demo import demo_photos


@pytest.fixture(scope="module")
def photos():
    p = demo_photos()
    crops = [p[n][:64, :64] for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def test_shapes_range_quantisation(photos):
    lr = RealESRGANDegradation()(photos, generator=torch.Generator().manual_seed(0))
    assert lr.shape == (4, 3, 16, 16) and lr.dtype == photos.dtype
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr * 255, (lr * 255).round())  # on 1/255 steps


def test_deterministic_per_generator(photos):
    deg = RealESRGANDegradation()
    a = deg(photos, generator=torch.Generator().manual_seed(5))
    b = deg(photos, generator=torch.Generator().manual_seed(5))
    c = deg(photos, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_variation(photos):
    same = photos[:1].expand(6, -1, -1, -1).contiguous()
    lr, params = RealESRGANDegradation()(same, generator=torch.Generator().manual_seed(1), return_params=True)
    assert len({round(p["jpeg1"], 6) for p in params}) == 6
    assert len({p["resize1"] for p in params}) == 6
    diffs = [(lr[i] - lr[0]).abs().mean().item() for i in range(1, 6)]
    assert min(diffs) > 1e-3  # the same HR gives six different LRs


def test_lr_resembles_downsampled_hr(photos):
    lr = RealESRGANDegradation()(photos, generator=torch.Generator().manual_seed(2))
    down = torch.nn.functional.interpolate(photos, scale_factor=0.25, mode="area")
    other = down.roll(1, 0)
    assert (lr - down).abs().mean() < (lr - other).abs().mean()


@pytest.mark.parametrize("kind", DegradationConfig().kernel_list + ["sinc"])
def test_every_kernel_type_sums_to_one(kind):
    draw = D._Draw(torch.Generator().manual_seed(3))
    cfg = DegradationConfig()
    for size in (7, 13, 21):
        if kind == "sinc":
            k = D.sinc_kernel(size, draw.uniform(math.pi / 5, math.pi))
        else:
            k = D.random_kernel(draw, kind, size, cfg.first.blur_sigma, cfg.first.betag_range, cfg.first.betap_range)
        assert k.shape == (size, size)
        assert float(k.sum()) == pytest.approx(1.0, abs=1e-9)
        assert torch.allclose(k, k.flip(0).flip(1), atol=1e-12)  # point symmetric
        padded = D._pad_kernel(k)
        assert padded.shape == (21, 21) and float(padded.sum()) == pytest.approx(1.0, abs=1e-9)


def test_kernel_shapes_match_their_definition():
    iso = D.bivariate_kernel(21, 2.0, 2.0, 0.0)
    g = D._grid(21)
    ref = torch.exp(-(g ** 2).sum(-1) / 8)
    assert torch.allclose(iso, ref / ref.sum(), atol=1e-12)
    aniso = D.bivariate_kernel(21, 3.0, 1.0, 0.0)
    assert aniso[10, 10 + 4] > aniso[10 + 4, 10]  # wider along x
    rot = D.bivariate_kernel(21, 3.0, 1.0, math.pi / 2)
    assert torch.allclose(rot, aniso.T, atol=1e-9)
    plateau = D.bivariate_kernel(21, 2.0, 2.0, 0.0, beta=2.0, plateau=True)
    q = (g ** 2).sum(-1) / 4
    ref = 1 / (1 + q ** 2)
    assert torch.allclose(plateau, ref / ref.sum(), atol=1e-12)
    sinc = D.sinc_kernel(21, math.pi / 2)
    assert (sinc < 0).any()  # ringing lobes


def test_blur_with_pulse_is_identity(photos):
    assert torch.allclose(D.filter2d(photos, D._pulse()), photos, atol=1e-6)


@pytest.mark.parametrize("quality", [30, 60, 95])
def test_jpeg_matches_a_real_codec(quality, photos):
    img = (photos[0] * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    pil = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float()[None] / 255
    src = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    ours = D.jpeg(src, quality)
    codec_err = (pil - src).abs().mean()
    assert (ours - pil).abs().mean() < 0.5 * codec_err  # far closer to libjpeg than to the input
    assert (ours - src).abs().mean() == pytest.approx(float(codec_err), rel=0.3)


def test_jpeg_odd_sizes_and_quality_order(photos):
    x = photos[:2, :, :23, :37]
    lo, hi = D.jpeg(x, 30), D.jpeg(x, 95)
    assert lo.shape == x.shape
    assert (lo - x).abs().mean() > (hi - x).abs().mean()


def test_poisson_noise_is_signal_dependent():
    g = torch.Generator().manual_seed(0)
    dark, bright = torch.full((1, 3, 64, 64), 0.05), torch.full((1, 3, 64, 64), 0.9)
    nd = D.poisson_noise(dark, 1.0, False, g) - dark
    nb = D.poisson_noise(bright, 1.0, False, g) - bright
    assert nb.std() > nd.std() > 0
    gray = D.poisson_noise(bright, 1.0, True, g) - bright
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_gaussian_noise_level_and_gray():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, 128, 128), 0.5)
    n = D.gaussian_noise(x, 20.0, False, g) - x
    assert float(n.std()) == pytest.approx(20 / 255, rel=0.05)
    gray = D.gaussian_noise(x, 20.0, True, g) - x
    assert torch.equal(gray[:, 0], gray[:, 2])


def test_poisson_path_forced(photos):
    cfg = DegradationConfig(first=DegradationPass(gaussian_noise_prob=0.0),
                            second=DegradationPass(gaussian_noise_prob=0.0))
    lr, params = RealESRGANDegradation(cfg)(photos, generator=torch.Generator().manual_seed(0), return_params=True)
    assert all(p["noise1"][0] == "poisson" and p["noise2"][0] == "poisson" for p in params)
    assert lr.shape == (4, 3, 16, 16)


def test_bad_input_shapes():
    deg = RealESRGANDegradation()
    with pytest.raises(ValueError, match="divisible"):
        deg(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        deg(torch.rand(3, 32, 32))


def test_half_precision_input_keeps_dtype(photos):
    lr = RealESRGANDegradation()(photos.half(), generator=torch.Generator().manual_seed(0))
    assert lr.dtype == torch.float16
