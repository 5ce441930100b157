"""DISTS against an independent float64 implementation (written differently: explicit loops, no
torch.split, pooling as an explicit window sum), on random VGG and alpha/beta weights."""
import pytest
import torch
import torch.nn.functional as F

from oars_fast.rewards import DISTSReward
from oars_fast.rewards.dists import _CONVS, CHANNELS, DISTS


def _random_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    vgg = {}
    for idx, cin, cout in _CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    n = sum(CHANNELS)
    ab = {"alpha": (0.1 + 0.01 * torch.randn(1, n, 1, 1, generator=g)).abs(),
          "beta": (0.1 + 0.01 * torch.randn(1, n, 1, 1, generator=g)).abs()}
    return vgg, ab


def _independent_dists(x, y, vgg, ab):
    x, y = x.double(), y.double()
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)

    def l2pool(h):
        hh = F.pad(h * h, (1, 1, 1, 1))
        wts = [[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]]
        out = 0
        for i in range(3):
            for j in range(3):
                out = out + wts[i][j] * hh[:, :, i:i + hh.shape[2] - 2, j:j + hh.shape[3] - 2]
        return (out[:, :, ::2, ::2] + 1e-12).sqrt()

    def levels(img):
        h = (img - mean) / std
        out = [img]
        plan = [[0, 2], ["p", 5, 7], ["p", 10, 12, 14], ["p", 17, 19, 21], ["p", 24, 26, 28]]
        for stage in plan:
            for op in stage:
                if op == "p":
                    h = l2pool(h)
                else:
                    h = F.relu(F.conv2d(h, vgg[f"features.{op}.weight"].double(),
                                        vgg[f"features.{op}.bias"].double(), padding=1))
            out.append(h)
        return out

    a, b = ab["alpha"].double().flatten(), ab["beta"].double().flatten()
    wsum = a.sum() + b.sum()
    fx, fy = levels(x), levels(y)
    scores = []
    for n in range(x.shape[0]):
        s, c = 0.0, 0
        for lx, ly in zip(fx, fy):
            for ch in range(lx.shape[1]):
                u, v = lx[n, ch], ly[n, ch]
                mu, mv = u.mean(), v.mean()
                s1 = (2 * mu * mv + 1e-6) / (mu ** 2 + mv ** 2 + 1e-6)
                cov = ((u - mu) * (v - mv)).mean()
                s2 = (2 * cov + 1e-6) / (((u - mu) ** 2).mean() + ((v - mv) ** 2).mean() + 1e-6)
                s = s + (a[c] * s1 + b[c] * s2) / wsum
                c += 1
        scores.append(1 - s)
    return torch.stack(scores)


@pytest.fixture(scope="module")
def model_and_weights():
    vgg, ab = _random_weights()
    return DISTS(vgg, ab).double(), vgg, ab


def test_matches_independent_float64(model_and_weights):
    m, vgg, ab = model_and_weights
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 37, 45, generator=g), torch.rand(2, 3, 37, 45, generator=g)
    ours = m(x.double(), y.double())
    ref = _independent_dists(x, y, vgg, ab)
    # float64 both; the only difference is cov = E[xy] - E[x]E[y] (published form) vs E[(x-mx)(y-my)]
    assert torch.allclose(ours, ref, atol=1e-8, rtol=0)


def test_identity_symmetry_range(model_and_weights):
    m, _, _ = model_and_weights
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(m(x, x), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(m(x, y), m(y, x), atol=1e-12)
    from oars_fast.data.demo import demo_photos

    photos = demo_photos()
    a = torch.from_numpy(photos["astronaut"][:64, :64]).permute(2, 0, 1)[None].double() / 255
    b = torch.from_numpy(photos["coffee"][:64, :64]).permute(2, 0, 1)[None].double() / 255
    d = m(a, b)
    assert 0 < float(d) <= 1 and float(m(a, a)) == pytest.approx(0, abs=1e-9)


def test_group_reuse_and_reward(model_and_weights):
    m, _, _ = model_and_weights
    m = m.float()
    g = torch.Generator().manual_seed(3)
    gt = torch.rand(2, 3, 32, 32, generator=g)
    cand = torch.rand(5, 3, 32, 32, generator=g)
    idx = torch.tensor([0, 0, 1, 1, 1])
    grouped = m.group_distance(cand, gt, idx)
    direct = m(cand, gt[idx])
    assert torch.allclose(grouped, direct, atol=1e-6)
    scores, parts = DISTSReward(m, batch_size=2)(None, cand, gt, idx)
    assert torch.allclose(scores, 1 - direct, atol=1e-6) and torch.allclose(parts["dists"], direct, atol=1e-6)
    with pytest.raises(ValueError, match="full-reference"):
        DISTSReward(m)(None, cand, None, idx)


def test_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16"):
        DISTS(tmp_path / "vgg16.pth", tmp_path / "weights.pt")
    vgg, ab = _random_weights()
    del vgg["features.28.weight"]
    with pytest.raises(KeyError, match="features.28"):
        DISTS(vgg, ab)
