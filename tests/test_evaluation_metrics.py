"""oars_fast.evaluation: PSNR / SSIM / LR consistency against independent references, pairwise accuracy."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from oars_fast.evaluation import (
    lr_consistency,
    pairwise_accuracy,
    pairwise_report,
    psnr,
    rgb_to_y,
    ssim,
)
from oars_fast.evaluation.metrics import quantize

# ----------------------------------------------------------------------------------------------- helpers


def to_tensor(*imgs: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float32 (B, 3, H, W) in [0, 1] (8-bit exact after quantize)."""
    return torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1) for a in imgs]).float() / 255.0


def y_numpy(img: np.ndarray) -> np.ndarray:
    """Independent BT.601 studio-swing Y on the 0..255 scale from uint8 RGB, float64, not rounded."""
    f = img.astype(np.float64)
    return 16.0 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0


def crop(a: np.ndarray, c: int) -> np.ndarray:
    return a[c:-c, c:-c] if c else a


def sk_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = None) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=channel_axis,
    )


def distortions(img: np.ndarray) -> list[np.ndarray]:
    """Blur, Gaussian noise, JPEG (PIL, q=30), 4x bicubic down-up (PIL): realistic SR-ish degradations."""
    h, w = img.shape[:2]
    f = img.astype(np.float64)
    blur = ndimage.gaussian_filter(f, sigma=(1.2, 1.2, 0))
    noise = f + np.random.default_rng(1).normal(0.0, 10.0, f.shape)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=30)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    pil = Image.fromarray(img)
    downup = np.asarray(pil.resize((w // 4, h // 4), Image.BICUBIC).resize((w, h), Image.BICUBIC))
    return [np.clip(np.round(x), 0, 255).astype(np.uint8) for x in (blur, noise, jpeg, downup)]


# Real photos shipped with scikit-image, centre-cropped to 160x192 (divisible by 4) to keep the test fast.
PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}


def photo(name: str) -> np.ndarray:
    img = PHOTOS[name]()
    h, w = img.shape[:2]
    top, left = (h - 160) // 2, (w - 192) // 2
    return np.ascontiguousarray(img[top : top + 160, left : left + 192, :3])


# ---------------------------------------------------- agreement with scikit-image (same convention)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_y_psnr_ssim_match_skimage_on_photos(name):
    hr = photo(name)
    dist = distortions(hr)
    sr_t, hr_t = to_tensor(*dist), to_tensor(*[hr] * len(dist))
    for c in (0, 4):
        p = psnr(sr_t, hr_t, crop_border=c, y_channel=True)
        s = ssim(sr_t, hr_t, crop_border=c, y_channel=True)
        assert p.dtype == s.dtype == torch.float64 and p.shape == s.shape == (len(dist),)
        y_hr = crop(y_numpy(hr), c)
        for k, d in enumerate(dist):
            y_sr = crop(y_numpy(d), c)
            assert p[k].item() == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-4)
            # scikit-image filters with reflect padding and then averages only the interior (crops
            # (11 - 1) / 2 = 5 px per side), which is exactly our valid filtering: no border difference.
            assert s[k].item() == pytest.approx(sk_ssim(y_hr, y_sr), abs=1e-4)
    # Sanity: the distortions are realistic, not trivial (finite PSNR, SSIM well below 1).
    assert torch.isfinite(p).all() and (s < 0.99).all() and (p > 15).all()


def test_rgb_psnr_ssim_match_skimage():
    hr = photo("chelsea")
    dist = distortions(hr)
    sr_t, hr_t = to_tensor(*dist), to_tensor(*[hr] * len(dist))
    p = psnr(sr_t, hr_t, crop_border=2)
    s = ssim(sr_t, hr_t, crop_border=2, y_channel=False)
    for k, d in enumerate(dist):
        a, b = crop(hr, 2), crop(d, 2)
        assert p[k].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4)
        # scikit-image's multichannel SSIM is the mean of the per-channel SSIMs, as in BasicSR.
        assert s[k].item() == pytest.approx(sk_ssim(a, b, channel_axis=-1), abs=1e-4)


# --------------------------------------------------------------------------- published reference values

# scikit-image's own test suite (skimage/metrics/tests/test_simple_metrics.py::test_PSNR_vs_IPOL and
# test_structural_similarity.py::test_gaussian_structural_similarity_vs_IPOL; not shipped in the wheel)
# checks data.camera() against a noisy copy made with np.random.seed(5), sigma 20, clip, cast to uint8,
# versus the values given by the `imdiff` program of the IPOL article https://www.ipol.im/pub/art/2011/g_lmii/
# (computed by Gregory Lee, Sep 2020, https://github.com/scikit-image/scikit-image/pull/4913#issuecomment-700653165):
IPOL_PSNR = 22.409353363576034  # dB; scikit-image asserts it to 4 decimals
IPOL_MSSIM = 0.357959091663361  # Gaussian-window SSIM; scikit-image asserts it to 3 decimals


def _ipol_pair() -> tuple[torch.Tensor, torch.Tensor]:
    cam = data.camera()
    rs = np.random.RandomState(5)  # legacy generator: the same stream as np.random.seed(5)
    noisy = np.clip(cam + 20.0 * rs.randn(*cam.shape), 0, 255).astype(cam.dtype)
    # Gray replicated to three channels: RGB PSNR (MSE over all channels) / RGB SSIM (mean over channels)
    # then equal the single-channel values.
    return to_tensor(np.repeat(cam[..., None], 3, axis=-1)), to_tensor(np.repeat(noisy[..., None], 3, axis=-1))


def test_rgb_psnr_ssim_match_published_ipol_values():
    hr, sr = _ipol_pair()
    assert psnr(sr, hr).item() == pytest.approx(IPOL_PSNR, abs=1e-4)
    assert ssim(sr, hr, y_channel=False).item() == pytest.approx(IPOL_MSSIM, abs=1e-3)


def test_psnr_off_by_one_is_20log10_255():
    # Analytic: every 8-bit value off by exactly 1 -> MSE = 1 -> PSNR = 10 log10(255^2) = 48.1308 dB.
    hr = photo("astronaut")
    sr = np.where(hr < 255, hr + 1, hr - 1).astype(np.uint8)
    expected = 20 * math.log10(255)
    assert expected == pytest.approx(48.1308, abs=1e-4)
    assert psnr(to_tensor(sr), to_tensor(hr)).item() == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------- conventions and errors


def test_identical_images_psnr_inf_ssim_one():
    x = torch.rand(2, 3, 32, 40)
    for y in (False, True):
        assert torch.isinf(psnr(x, x.clone(), y_channel=y)).all()
        assert torch.allclose(ssim(x, x.clone(), y_channel=y), torch.ones(2, dtype=torch.float64))
    # Differences below half an 8-bit step vanish in the rounding; out-of-range values are clamped.
    q = quantize(x) / 255.0
    assert torch.isinf(psnr(q + 1e-3, q)).all()
    assert torch.isinf(psnr(torch.full_like(x, 1.5), torch.ones_like(x))).all()
    # Mixed batch: only the identical sample is +inf.
    y = x.clone()
    y[1] = 1.0 - y[1]
    p = psnr(y, x)
    assert math.isinf(p[0].item()) and math.isfinite(p[1].item())
    # NaN is not mistaken for "identical": it propagates.
    y[0, 0, 0, 0] = float("nan")
    assert math.isnan(psnr(y, x)[0].item())


def test_crop_border():
    hr = torch.rand(1, 3, 40, 48)
    sr = hr.clone()
    sr[..., :3, :] = 1.0 - sr[..., :3, :]  # only the top 3 rows differ
    assert math.isfinite(psnr(sr, hr, crop_border=2).item())
    assert math.isinf(psnr(sr, hr, crop_border=3).item())
    assert ssim(sr, hr, crop_border=2).item() < 1.0
    assert ssim(sr, hr, crop_border=3).item() == pytest.approx(1.0, abs=1e-12)
    # crop_border=c equals slicing c pixels from each side by hand.
    sr2 = torch.rand(2, 3, 40, 48)
    c = 4
    sl = (..., slice(c, -c), slice(c, -c))
    hr2 = hr.expand(2, -1, -1, -1)
    assert torch.equal(psnr(sr2, hr2, crop_border=c), psnr(sr2[sl], hr2[sl]))
    assert torch.allclose(ssim(sr2, hr2, crop_border=c), ssim(sr2[sl], hr2[sl]))
    assert torch.equal(psnr(sr2, hr2, crop_border=np.int64(c)), psnr(sr2, hr2, crop_border=c))  # numpy ints ok


def test_y_channel_switch_and_rgb_to_y():
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    y = rgb_to_y(x.double()).flatten() * 255
    assert y.tolist() == pytest.approx([235.0, 16.0, 16.0 + 65.481])
    hr_np = photo("coffee")
    hr, sr = to_tensor(hr_np), to_tensor(distortions(hr_np)[1])
    p_rgb, p_y = psnr(sr, hr), psnr(sr, hr, y_channel=True)
    assert p_rgb.item() != pytest.approx(p_y.item(), abs=0.01)
    # Y PSNR is the PSNR of the (unrounded) Y planes with data range 255.
    ya, yb = rgb_to_y(quantize(sr) / 255) * 255, rgb_to_y(quantize(hr) / 255) * 255
    assert p_y.item() == pytest.approx(10 * math.log10(255**2 / ((ya - yb) ** 2).mean().item()), abs=1e-9)
    # Default channels: PSNR on RGB, SSIM on Y.
    assert torch.equal(ssim(sr, hr), ssim(sr, hr, y_channel=True))
    assert not torch.equal(ssim(sr, hr), ssim(sr, hr, y_channel=False))


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_shape_errors(fn):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(x, torch.rand(1, 3, 32, 31))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fn(x[0], x[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fn(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="float"):
        fn((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="crop_border"):
        fn(x, x, crop_border=-1)
    with pytest.raises(ValueError, match="too large"):
        fn(x, x, crop_border=16)
    if fn is ssim:  # the cropped image must still hold one 11x11 window
        fn(x, x, crop_border=10)
        with pytest.raises(ValueError, match="too large"):
            fn(x, x, crop_border=11)
    else:
        fn(x, x, crop_border=15)


def test_lr_consistency():
    hr = photo("astronaut")
    h, w = hr.shape[:2]
    lr = np.asarray(Image.fromarray(hr).resize((w // 4, h // 4), Image.BICUBIC))
    sr = np.asarray(Image.fromarray(lr).resize((w, h), Image.BICUBIC))
    sr_t, lr_t = to_tensor(sr, hr), to_tensor(lr, lr)
    v = lr_consistency(sr_t, lr_t, scale=4)
    assert v.shape == (2,) and v.dtype == torch.float64
    assert torch.equal(v, lr_consistency(sr_t, lr_t))  # scale inferred
    # Independent check of the documented downsampling: PIL's float ("F" mode) bicubic resize is the same
    # antialiased Keys (a = -0.5) filter. Allow a little for float32 rounding flips at .5 boundaries.
    for k, img in enumerate((sr, hr)):
        planes = [Image.fromarray(img[..., c].astype(np.float32), "F") for c in range(3)]
        down = np.stack([np.asarray(p.resize((w // 4, h // 4), Image.BICUBIC)) for p in planes], axis=-1)
        down = np.clip(np.round(down.astype(np.float64)), 0, 255)
        ref = peak_signal_noise_ratio(lr.astype(np.float64), down, data_range=255)
        assert v[k].item() == pytest.approx(ref, abs=0.02)
    # Constant images stay constant after downsampling (weights sum to 1): +inf. 100/255 keeps clear of
    # the .5 rounding boundary.
    c = 100 / 255
    assert math.isinf(lr_consistency(torch.full((1, 3, 16, 16), c), torch.full((1, 3, 4, 4), c)).item())
    with pytest.raises(ValueError, match="scale=2"):
        lr_consistency(sr_t, lr_t, scale=2)
    with pytest.raises(ValueError, match="integer multiple"):
        lr_consistency(torch.rand(1, 3, 30, 32), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="integer multiple"):
        lr_consistency(torch.rand(1, 3, 32, 16), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        lr_consistency(torch.rand(2, 3, 32, 32), torch.rand(1, 3, 8, 8))


def test_back_projection():
    """Iterative back-projection (oars_fast.models.consistency): an output off its input by a colour cast is
    pulled back exactly (the downsampler and the bicubic upsampler keep constants), its LR consistency rises
    with each step, and bad shapes are refused."""
    from oars_fast.models.consistency import back_project, downsample

    g = torch.Generator().manual_seed(3)
    x = 0.25 + 0.5 * F.avg_pool2d(torch.rand(2, 3, 52, 68, generator=g), 5, 1, 2)  # in [0.25, 0.75], smooth
    lr = downsample(x, (13, 17))
    cast = torch.tensor([0.1, -0.08, 0.05]).view(1, 3, 1, 1)
    # one step removes the cast: down(x + c) = down(x) + c and up(-c) = -c, so bp(x + c) = x + c + up(-c) = x;
    # with c = 0 this is the fixed point: an output whose downsampling is the LR stays as it is
    torch.testing.assert_close(back_project(x + cast, lr, 1), x, atol=2e-6, rtol=0)
    # on an unrelated output the consistency rises step by step
    sr = torch.rand(2, 3, 52, 68, generator=g)
    lr8 = (lr * 255).round() / 255
    scores = [lr_consistency(back_project(sr, lr8, k), lr8).mean().item() for k in range(4)]
    assert scores == sorted(scores) and scores[1] > scores[0] + 10, scores
    assert back_project(sr, lr8, 0) is sr
    out = back_project(sr.double(), lr8, 2)
    assert out.dtype == torch.float64 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="integer multiple"):
        back_project(torch.rand(1, 3, 30, 32), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        back_project(sr, lr8, -1)
    with pytest.raises(ValueError, match="equal B and C"):
        back_project(torch.rand(1, 3, 32, 32), torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------------------------ pairwise accuracy

# Group A (K=3): 0 beats 1, 0 ties 2, 2 beats 1. Group B (K=2): a tie. Group C (K=4): i beats j for i < j
# except 3 beats 2. Group D (K=1): no pairs. The diagonal holds junk on purpose (it must be ignored).
PREFS = [
    np.array([[9, 1, 0.5], [0, 9, 0], [0.5, 1, 9]]),
    np.array([[0, 0.5], [0.5, 0]]),
    np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]]),
    np.zeros((1, 1)),
]
SCORES = [np.array([3.0, 1.0, 2.0]), torch.tensor([0.5, 0.5]), [4.0, 3.0, 2.0, 1.0], np.array([7.0])]


def test_pairwise_accuracy_hand_computed():
    # delta=0: A: (0,1) pred 1 ok, (0,2) pred 1 vs tie wrong, (1,2) pred 0 ok -> 2/3. B: equal scores ->
    # predicted tie, ok -> 1/1. C: all predicted 1, (2,3) labelled 0 -> 5/6. Pooled: 8/10.
    r = pairwise_report(SCORES, PREFS)
    assert r.accuracy == pytest.approx(0.8) and pairwise_accuracy(SCORES, PREFS) == pytest.approx(0.8)
    assert r.num_pairs == 10 and r.num_correct == 8 and r.group_num_pairs == [3, 1, 6, 0]
    assert r.group_accuracies[:3] == pytest.approx([2 / 3, 1.0, 5 / 6]) and math.isnan(r.group_accuracies[3])
    # rows: label 0 / 0.5 / 1; columns: prediction 0 / 0.5 / 1
    np.testing.assert_array_equal(r.confusion, [[1, 0, 1], [0, 1, 1], [0, 0, 6]])
    # delta=1: A: (0,1) ok, (0,2) |1| <= 1 -> tie ok, (1,2) tie vs 0 wrong -> 2/3; C: all gaps <= 1 except
    # (0,2), (0,3), (1,3) -> 3 correct (labels 1) of 6; B ok. Pooled: (2 + 1 + 3) / 10.
    r1 = pairwise_report(SCORES, PREFS, delta=1.0)
    assert r1.accuracy == pytest.approx(0.6) and r1.group_accuracies[:3] == pytest.approx([2 / 3, 1.0, 0.5])
    np.testing.assert_array_equal(r1.confusion, [[0, 2, 0], [0, 2, 0], [0, 2, 4]])
    # Huge delta: everything predicted a tie -> only the two tie labels are right.
    assert pairwise_accuracy(SCORES, PREFS, delta=100.0) == pytest.approx(0.2)
    # Perfectly anti-correlated scores on a strict order: 0.
    assert pairwise_accuracy([[1.0, 2.0, 3.0]], [np.triu(np.ones((3, 3)), 1)]) == 0.0


@pytest.mark.parametrize(
    "scores, prefs, delta, match",
    [
        (SCORES[:2], PREFS[:1], 0.0, "2 score groups but 1"),
        ([[1.0, 2.0]], [np.zeros((2, 3))], 0.0, "square"),
        ([[1.0, 2.0, 3.0]], [np.array([[0, 1], [0, 0]])], 0.0, "2x2 but there are 3 scores"),
        ([[1.0, 2.0], [1.0, 2.0]], [np.array([[0, 1], [0, 0]]), np.array([[0, 1], [1, 0]])], 0.0,
         r"group 1, pair \(0, 1\): inconsistent"),
        ([[1.0, 2.0]], [np.array([[0, 0.7], [0.3, 0]])], 0.0, "0, 0.5 or 1"),
        ([[1.0, float("nan")]], [np.array([[0, 1], [0, 0]])], 0.0, "NaN"),
        ([[[1.0, 2.0]]], [np.array([[0, 1], [0, 0]])], 0.0, "1-D"),
        ([[1.0, 2.0]], [np.array([[0, 1], [0, 0]])], -0.1, "delta"),
        ([[1.0]], [np.zeros((1, 1))], 0.0, "no pairs"),
    ],
)
def test_pairwise_invalid_inputs(scores, prefs, delta, match):
    with pytest.raises(ValueError, match=match):
        pairwise_accuracy(scores, prefs, delta)
