"""Kernels vs their float64 references on fresh random inputs and awkward shapes.

Tolerance is tied to PyTorch's own error in the same dtype: err(kernel) <= 2 * err(torch) for
outputs and 3 * err(torch) for gradients, both against float64 (plus a floor of a few ulps of the
output's magnitude, for cases where torch happens to be exact). On CPU the kernels run in Triton's
interpreter (float32/float16); on a GPU the same tests also run bfloat16.
"""
import pytest
import torch

from oars_fast import kernels as K
from oars_fast.kernels import _common

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
pytestmark = pytest.mark.skipif(not _common.use_triton(torch.zeros(1, device=DEV)),
                                reason="Triton cannot run here (no GPU and TRITON_INTERPRET unset)")


def _close(ours, same_dtype, ref64, factor):
    err = (ours.double() - ref64).abs().max().item()
    err_torch = (same_dtype.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(ours.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= factor * err_torch + floor, f"kernel err {err:.3g} vs torch err {err_torch:.3g} (floor {floor:.3g})"


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(123)  # the same upstream gradient for every provider
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    out.backward(g)
    return out.detach(), [t.grad if t.requires_grad else None for t in inputs]


# ------------------------------------------------------------------------------------------------
LORA_SHAPES = [  # (leading dims of x, in, out, rank)
    ((1,), 1, 1, 1), ((7,), 13, 5, 3), ((37,), 53, 29, 5), ((2, 65), 64, 130, 16), ((3, 5, 11), 97, 33, 33),
    ((131,), 70, 67, 32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", LORA_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_reference(dtype, lead, k, n, r, bias):
    g = torch.Generator().manual_seed(hash((lead, k, n, r)) % 2**31)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / max(1, s[-1]) ** 0.5)  # noqa: E731
    x, w, a, b = mk(*lead, k), mk(n, k), mk(r, k), mk(n, r)
    bb = mk(n) if bias else None
    inputs64 = [t.requires_grad_() for t in (x, w, a, b)] + ([bb.requires_grad_()] if bias else [])

    def call(fn, ts):
        x_, w_, a_, b_ = ts[:4]
        return fn(x_, w_, ts[4] if bias else None, a_, b_, 1.7)

    with _common.backend("auto"):
        out, grads = _grads(lambda *t: call(K.lora_linear, t), [t.to(DEV, dtype) for t in inputs64])
    with _common.backend("torch"):
        out_t, grads_t = _grads(lambda *t: call(K.lora_linear_ref, t), [t.to(DEV, dtype) for t in inputs64])
    out64, grads64 = _grads(lambda *t: call(K.lora_linear_ref, t), inputs64)
    assert out.shape == (*lead, n)
    _close(out, out_t, out64.to(DEV), 2)
    for ours, same, ref in zip(grads, grads_t, grads64):
        _close(ours, same, ref.to(DEV), 3)


def test_lora_linear_frozen_base_skips_base_grads():
    x = torch.randn(9, 12, device=DEV, requires_grad=True)
    w, bias = torch.randn(6, 12, device=DEV), torch.randn(6, device=DEV)
    a = torch.randn(4, 12, device=DEV, requires_grad=True)
    b = torch.randn(6, 4, device=DEV, requires_grad=True)
    K.lora_linear(x, w, bias, a, b, 2.0).square().sum().backward()
    assert w.grad is None and a.grad is not None and b.grad is not None and x.grad is not None


def test_lora_linear_shape_errors():
    with pytest.raises(ValueError, match="shapes"):
        K.lora_linear(torch.randn(2, 5), torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)


def test_lora_linear_opcheck():
    x, w, bias = torch.randn(17, 24, device=DEV), torch.randn(20, 24, device=DEV), torch.randn(20, device=DEV)
    a, b = torch.randn(4, 24, device=DEV), torch.randn(20, 4, device=DEV)
    for t in (x, w, a, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.oars_fast.lora_linear.default, (x, w, bias, a, b, 2.0))


# ------------------------------------------------------------------------------------------------
NFT_SHAPES = [(1, 1), (3, 7), (5, 3, 17, 19), (2, 4, 1031), (4, 16, 8, 8), (2, 3, 2048 + 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NFT_SHAPES, ids=str)
@pytest.mark.parametrize("beta,kl_weight,with_ref,adaptive", [(1.0, 0.0, False, True), (0.5, 0.3, True, True),
                                                               (2.0, 1e-4, True, False)])
def test_nft_loss_matches_reference(dtype, shape, beta, kl_weight, with_ref, adaptive):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    b = shape[0]
    v = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(4)]
    t, r = torch.rand(b, generator=g, dtype=torch.float64), torch.rand(b, generator=g, dtype=torch.float64)
    v[0].requires_grad_()

    def call(fn, th, old, tg, ref, tt, rr):
        return fn(th, old, tg, tt, rr, beta, ref if with_ref else None, kl_weight, adaptive)

    cast = lambda d: [x.to(DEV, d) for x in v] + [t.to(DEV), r.to(DEV)]  # noqa: E731
    out, (gk, *_) = _grads(lambda *a: call(K.nft_loss, *a), cast(dtype))
    with _common.backend("torch"):
        out_t, (gt, *_) = _grads(lambda *a: call(K.nft_loss_ref, *a), cast(dtype))
    out64, (g64, *_) = _grads(lambda *a: call(K.nft_loss_ref, *a), v + [t, r])
    assert out.dtype == torch.float32 and out.ndim == 0
    _close(out, out_t, out64.to(DEV), 2)
    assert gk.dtype == dtype
    _close(gk, gt, g64.to(DEV), 3)


def test_nft_loss_stats_and_constants():
    v = [torch.randn(3, 5, 6, device=DEV) for _ in range(4)]
    v[0].requires_grad_()
    t, r = torch.rand(3, device=DEV), torch.rand(3, device=DEV)
    loss, stats = K.nft_loss_with_stats(v[0], v[1], v[2], t, r, 1.0, v[3], 0.5)
    with _common.backend("torch"):
        loss_t, stats_t = K.nft_loss_with_stats(v[0], v[1], v[2], t, r, 1.0, v[3], 0.5)
    for k in ("pos", "neg", "kl", "w_pos", "w_neg"):
        assert float(stats[k]) == pytest.approx(float(stats_t[k]), rel=1e-4)
        assert not stats[k].requires_grad
    v1 = v[1].clone().requires_grad_()
    K.nft_loss(v[0], v1, v[2], t, r).backward()
    assert v1.grad is None  # v_old is a constant


def test_nft_loss_r_extremes_pick_one_side():
    v = [torch.randn(2, 64, device=DEV) for _ in range(3)]
    t = torch.full((2,), 0.5, device=DEV)
    one, zero = torch.ones(2, device=DEV), torch.zeros(2, device=DEV)
    _, s = K.nft_loss_with_stats(v[0], v[1], v[2], t, one)
    assert float(K.nft_loss(v[0], v[1], v[2], t, one)) == pytest.approx(float(s["pos"]), rel=1e-5)
    assert float(K.nft_loss(v[0], v[1], v[2], t, zero)) == pytest.approx(float(s["neg"]), rel=1e-5)


def test_nft_loss_opcheck():
    v = [torch.randn(3, 4, 5, device=DEV) for _ in range(4)]
    v[0].requires_grad_()
    t, r = torch.rand(3, device=DEV), torch.rand(3, device=DEV)
    torch.library.opcheck(torch.ops.oars_fast.nft_loss.default, (v[0], v[1], v[2], t, r, v[3], 1.0, 0.1, True))


def test_nft_loss_input_errors():
    v = torch.randn(2, 3, device=DEV)
    with pytest.raises(ValueError, match="t must"):
        K.nft_loss(v, v, v, torch.rand(3, device=DEV), torch.rand(2, device=DEV))
    with pytest.raises(ValueError, match="v_old"):
        K.nft_loss(v, v[:1], v, torch.rand(2, device=DEV), torch.rand(2, device=DEV))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1029), (24, 4)], ids=str)
def test_compass_reward_matches_reference(shape):
    g = torch.Generator().manual_seed(7)
    f = torch.rand(*shape, generator=g, dtype=torch.float64) * 0.98 + 0.02
    ql = torch.rand(*shape, generator=g, dtype=torch.float64) * 4 + 1
    qs = torch.rand(*shape, generator=g, dtype=torch.float64) * 4 + 1
    ins = [x.requires_grad_() for x in (f, ql, qs)]
    out, grads = _grads(K.compass_reward, [x.to(DEV, torch.float32) for x in ins])
    with _common.backend("torch"):
        out_t, grads_t = _grads(K.compass_reward, [x.to(DEV, torch.float32) for x in ins])
    out64, grads64 = _grads(K.compass_reward_ref, ins)
    _close(out, out_t, out64.to(DEV), 2)
    for a, b, c in zip(grads, grads_t, grads64):
        _close(a, b, c.to(DEV), 3)


def test_compass_reward_known_values_and_broadcast():
    # F = 1: R = Q_SR; F = 0: R = 0; and the formula at one hand-computed point
    q_lr = torch.tensor([2.0, 3.0], device=DEV)
    q_sr = torch.tensor([4.0, 1.5], device=DEV)
    assert torch.allclose(K.compass_reward(torch.ones(2, device=DEV), q_lr, q_sr), q_sr)
    assert torch.allclose(K.compass_reward(torch.zeros(2, device=DEV), q_lr, q_sr), torch.zeros(2, device=DEV))
    r = K.compass_reward(torch.tensor([0.5], device=DEV), torch.tensor([3.5], device=DEV), torch.tensor([4.5], device=DEV))
    assert float(r) == pytest.approx(0.5 * 3.5 + 0.5 ** 0.5 * 1.0, rel=1e-6)
    f = torch.rand(4, 1, device=DEV, requires_grad=True)
    out = K.compass_reward(f, torch.full((1, 3), 2.0, device=DEV), torch.full((4, 3), 3.0, device=DEV))
    out.sum().backward()
    assert out.shape == (4, 3) and f.grad.shape == (4, 1)


def test_compass_reward_opcheck():
    f, ql, qs = torch.rand(6, device=DEV) + 0.1, torch.rand(6, device=DEV) * 4 + 1, torch.rand(6, device=DEV) * 4 + 1
    for t in (f, ql, qs):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.oars_fast.compass_reward.default, (f, ql, qs, 7.0))


# ------------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    # group 0: [0, 1] -> mean .5; group 1: [.95, .96] (filtered: mean > .9, std .005 < .05)
    rew = torch.tensor([0.0, 1.0, 0.95, 0.96], device=DEV)
    r, keep = K.group_advantages(rew, 2, clip=5.0, eps=1e-4, global_std=False)
    # within-group std of group 0 is 0.5: A = -+1 -> r = 0.5 -+ 0.1
    assert torch.allclose(r[:2], torch.tensor([0.4, 0.6], device=DEV), atol=1e-4)
    assert keep.tolist() == [True, True, False, False]
    r_g, _ = K.group_advantages(rew, 2, global_std=True)
    std = rew.std(unbiased=False)
    assert float(r_g[0]) == pytest.approx(0.5 - 0.5 / (float(std) + 1e-4) / 5 / 2, rel=1e-5)


def test_group_advantages_equal_rewards_and_singletons():
    r, keep = K.group_advantages(torch.full((6,), 0.3, device=DEV), 3)
    assert torch.allclose(r, torch.full((6,), 0.5, device=DEV)) and keep.all()  # no signal, but mean <= .9
    r, keep = K.group_advantages(torch.full((6,), 0.97, device=DEV), 3)
    assert not keep.any()  # saturated groups are dropped
    r1, keep1 = K.group_advantages(torch.tensor([0.1, 0.9, 0.95], device=DEV), 1)
    assert torch.allclose(r1, torch.full((3,), 0.5, device=DEV))  # one-sample groups: A = 0
    assert keep1.tolist() == [True, True, False]  # std 0 < .05 and mean .95 > .9


@pytest.mark.parametrize("n_groups,size", [(1, 24), (5, 24), (3, 7), (33, 2)])
@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_matches_reference(n_groups, size, global_std):
    rew = torch.rand(n_groups * size, device=DEV)
    rew[:size] = 0.95 + 0.01 * torch.rand(size, device=DEV)  # one filtered group
    r, keep = K.group_advantages(rew, size, clip=2.0, global_std=global_std)
    r_ref, keep_ref = K.group_advantages_ref(rew, size, clip=2.0, global_std=global_std)
    assert torch.allclose(r, r_ref, atol=1e-5) and torch.equal(keep, keep_ref)
    assert not keep[:size].any() or size == 1


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple"):
        K.group_advantages(torch.rand(10), 3)
    with pytest.raises(ValueError, match="1-D"):
        K.group_advantages(torch.rand(2, 3), 3)


def test_top_level_kernels_import_is_inert():
    """From the repo root `kernels/` is reachable as a top-level package; libraries probing for the PyPI
    `kernels` import it. That import must not register our ops again (it corrupted the dispatcher)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import oars_fast.kernels as ok\n"
            "import kernels\n"
            "assert kernels is not ok and not hasattr(kernels, 'lora_linear') and not hasattr(kernels, '__version__')\n"
            "import torch\n"
            "print(float(ok.group_advantages(torch.rand(8), 4)[0].sum()))\n" % root)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
