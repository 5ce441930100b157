"""rl.fp8_nograd (oars_fast/models/fp8.py): fp8 e4m3 row-wise GEMMs for the frozen transformer weights in RL's
no-grad forwards. The CPU build's torch._scaled_mm runs row-wise scales, so everything but speed and CUDA's
bf16 numerics is checked here."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oars_fast.config import ConfigError, LoRAConfig, ModelConfig, RLJob, load_config
from oars_fast.models import fp8
from oars_fast.models.backbone import build_tiny
from oars_fast.models.lora import PolicyAdapters, use_lora_kernel

# e4m3 has 3 mantissa bits: each quantised value is off by <= 2^-4 relative, ~2^-4/sqrt(3) RMS; activations and
# weights both quantised -> ~3.6% RMS on Gaussian data (measured 3.5-3.7%). The bound the tests hold:
REL_BOUND = 0.05

AWKWARD = [(1, 1, 1), (5, 7, 13), (17, 33, 31), (3, 130, 257), (64, 48, 80)]  # (M, N, K)


def _cpu_rowwise() -> bool:
    """Whether this torch's CPU _scaled_mm takes row-wise scales, probed with torch itself (not with fp8.py, whose
    own regressions must fail the tests below, not skip them)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


CPU_ROWWISE = _cpu_rowwise()
NO_CPU_GEMM = ("test_quantize_rows", "test_refusals", "test_scaled_mm_on_the_gpu")


@pytest.fixture(autouse=True)
def _cpu_fp8_gemms(request):
    """The CPU tests need the CPU build's row-wise _scaled_mm (torch 2.13 has it; 2.11, on the GPU machines,
    supports per-tensor scales only there): skipped, not failed, where it is missing."""
    if not CPU_ROWWISE and not request.node.name.startswith(NO_CPU_GEMM):
        pytest.skip("this torch's CPU _scaled_mm has no row-wise scales")


def _inputs(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    if m >= 3:
        x[0] = 0  # a zero row
        x[1] *= 1e4  # a large-magnitude row
        x[2] *= 1e-4  # a tiny one
    return x, w, b


@pytest.mark.parametrize("m,n,k", AWKWARD)
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_matches_dequantised_reference(m, n, k, bias):
    x, w, b = _inputs(m, n, k, seed=m * 1000 + n + k)
    b = b if bias else None
    w_q, w_s = fp8.quantize_weight(w)
    assert w_q.dtype == fp8.FP8 and w_q.shape == (-(-n // 16) * 16, -(-k // 16) * 16) and w_s.shape == (1, w_q.shape[0])
    y = fp8.fp8_linear(x, w_q, w_s, n, b, out_dtype=torch.float32)
    ref = fp8.fp8_linear_ref(x, w_q, w_s, n, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-6)
    if m >= 3:  # a zero row gives the bias exactly (or 0), nothing else
        assert torch.equal(y[0], b if bias else torch.zeros(n))
        for row in (1, 2):  # row-wise scales: very large or very small rows keep their relative accuracy
            exact = x[row] @ w.t()
            assert float((y[row] - (b if bias else 0) - exact).norm() / exact.norm()) < 3 * REL_BOUND
    # batched leading dims and a non-contiguous input take the same path
    xb = torch.randn(2, m, k).transpose(0, 1)
    assert torch.allclose(fp8.fp8_linear(xb, w_q, w_s, n, b), fp8.fp8_linear_ref(xb, w_q, w_s, n, b),
                          rtol=1e-5, atol=1e-4)


def test_quantize_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 4.0], [1e-30, 0.0, -1e-30], [3e5, 1.0, -1.0]])
    q, s = fp8.quantize_rows(x, cols=5)
    assert q.shape == (4, 5) and s.shape == (4, 1) and q.dtype == fp8.FP8
    assert torch.equal(q[0].float(), torch.zeros(5)) and torch.equal(q[:, 3:].float(), torch.zeros(4, 2))
    assert torch.equal(q.float().abs().amax(1), torch.tensor([0.0, 448.0, 448.0, 448.0]))  # each row's max -> 448
    assert torch.allclose(q[1, :3].float() * s[1], x[1])  # 1, -2, 4 are exact in e4m3 at this scale
    assert torch.isfinite(s).all() and (s > 0).all()
    q, _ = fp8.quantize_rows(torch.randn(16, 32).t())  # a column-major input: row-major codes (cuBLASLt's A)
    assert q.is_contiguous()


@pytest.mark.parametrize("m,n,k", [(64, 64, 64), (200, 256, 64), (37, 33, 129)])
def test_fp8_linear_relative_error_within_bound(m, n, k):
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    w_q, w_s = fp8.quantize_weight(w)
    exact = x.double() @ w.double().t()
    err = float((fp8.fp8_linear(x, w_q, w_s, n).double() - exact).norm() / exact.norm())
    assert 0.005 < err < REL_BOUND  # it is really quantised, and within the bound


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with fp8 GEMMs (sm_89+)")
@pytest.mark.parametrize("m,n,k", [(16384, 3072, 3072), *AWKWARD])
def test_scaled_mm_on_the_gpu_matches_the_reference_in_bf16(m, n, k):
    """On sm_89+: cuBLASLt's row-wise fp8 GEMM with bf16 output against the dequantised fp32 reference (the output
    is rounded to bf16 once), and its error against the exact product within the stated bound."""
    x, w, b = (t.cuda() for t in _inputs(m, n, k, seed=7))
    w_q, w_s = fp8.quantize_weight(w)
    y = fp8.fp8_linear(x.bfloat16(), w_q, w_s, n, b, out_dtype=torch.bfloat16)
    ref = fp8.fp8_linear_ref(x.bfloat16().float(), w_q, w_s, n, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1e-2 * float(ref.abs().max()))
    if k >= 64 and m >= 4:  # (short dot products: one rounding of each operand, up to ~12% per element)
        exact = (x.double() @ w.double().t())[3:]  # (the zero, huge and tiny rows are checked on the CPU)
        err = float(((y.double() - b.double())[3:] - exact).norm() / exact.norm())
        assert err < REL_BOUND, err
    xt = x.bfloat16().t().contiguous().t()  # column-major activations (check_support's own probe is one)
    assert torch.equal(fp8.fp8_linear(xt, w_q, w_s, n, b, out_dtype=torch.bfloat16), y)
    fp8.check_support("cuda", torch.bfloat16)


def test_cache_reuses_and_invalidates():
    layer = nn.Linear(24, 40)
    layer.__class__ = fp8.Fp8Linear
    layer.fp8_on = True
    x = torch.randn(6, 24)
    with torch.no_grad():
        y1 = layer(x)
        codes = layer._fp8_cache[1]
        y2 = layer(x)
        assert layer.fp8_quantizations == 1 and layer._fp8_cache[1] is codes and torch.equal(y1, y2)
        layer.weight.mul_(2)  # in place: the version counter moves
        y3 = layer(x)
        assert layer.fp8_quantizations == 2 and torch.allclose(y3 - layer.bias, 2 * (y1 - layer.bias), rtol=1e-5,
                                                                 atol=1e-5)
        layer.load_state_dict({"weight": torch.randn(40, 24), "bias": layer.bias.clone()})
        layer(x)
        assert layer.fp8_quantizations == 3
        layer.weight.data += 1  # through .data: no version bump; invalidate() is the documented way
        layer(x)
        assert layer.fp8_quantizations == 3
        fp8.invalidate(layer)
        y4 = layer(x)
        assert layer.fp8_quantizations == 4
        w_q, w_s = fp8.quantize_weight(layer.weight)
        assert torch.equal(y4, fp8.fp8_linear(x, w_q, w_s, 40, layer.bias))


def _tiny_transformer(kernel="peft"):
    model = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=0)
    policy = PolicyAdapters(model.transformer, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for _, cur in policy._pairs():
            cur.normal_(0, 0.1)
    use_lora_kernel(model.transformer, kernel)
    return model, policy


def test_targets_are_the_block_linears_only():
    model, _ = _tiny_transformer()
    forwards = fp8.enable(model.transformer)
    names = forwards.names
    assert names and all(n.startswith("transformer_blocks.") for n in names)
    assert not any("_mod." in n or ".lora_" in n for n in names)
    assert "transformer_blocks.0.attn.to_q.base_layer" in names and "transformer_blocks.0.img_mlp.net.2" in names
    assert not any(isinstance(m, fp8.Fp8Linear) for m in (model.transformer.proj_out, model.transformer.img_in))
    assert not any(isinstance(m, fp8.Fp8Linear) for m in model.vae.modules())
    # peft's merge writes through .data: the LoRA layer's merged adapters are part of the cache key
    layer = model.transformer.transformer_blocks[0].attn.to_q
    base = layer.get_base_layer()
    with torch.no_grad(), forwards.on():
        x = torch.randn(3, base.in_features)
        base(x)
        n = base.fp8_quantizations
        layer.merge()
        y = base(x)
        assert base.fp8_quantizations == n + 1
        assert torch.equal(y, fp8.fp8_linear(x, *fp8.quantize_weight(base.weight), base.out_features, base.bias))
        layer.unmerge()


def _velocity(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    return model.velocity(x, torch.tensor([0.3, 0.8]), c)


def test_grad_enabled_forward_is_bit_identical():
    model, _ = _tiny_transformer("addmm")
    ref = _velocity(model)  # before the option exists
    ref.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None}
    model.transformer.zero_grad(set_to_none=True)
    forwards = fp8.enable(model.transformer)
    with forwards.on():
        out = _velocity(model)  # grad enabled: nn.Linear's forward, bit for bit
        out.float().pow(2).mean().backward()
        with torch.no_grad():
            nograd = _velocity(model)  # the same call without grad runs fp8
    assert torch.equal(out, ref)
    for n, p in model.transformer.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    assert not torch.equal(nograd, ref.detach())
    err = float((nograd - ref.detach()).norm() / ref.detach().norm())
    assert err < 2 * REL_BOUND
    assert all(not m.fp8_on for m in forwards.layers)  # the context restores


@pytest.mark.parametrize("kernel", ["peft", "addmm", "triton"])
def test_each_lora_kernel_adds_the_lora_branch_to_the_fp8_base(kernel):
    model, policy = _tiny_transformer(kernel)
    forwards = fp8.enable(model.transformer)
    layer = model.transformer.transformer_blocks[0].attn.to_k
    base = layer.get_base_layer()
    x = torch.randn(2, 5, base.in_features)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = fp8.fp8_linear(x, *fp8.quantize_weight(base.weight), base.out_features, base.bias) + \
        F.linear(F.linear(x, a), b) * s
    with torch.no_grad(), forwards.on():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with policy.use("ref"):  # adapters off: the fp8 base alone
            torch.testing.assert_close(layer(x), expected - F.linear(F.linear(x, a), b) * s, rtol=1e-5, atol=1e-5)
        with policy.use("old"):  # the old adapter's branch
            ao, bo = layer.lora_A["old"].weight, layer.lora_B["old"].weight
            torch.testing.assert_close(layer(x), expected - F.linear(F.linear(x, a), b) * s +
                                       F.linear(F.linear(x, ao), bo) * s, rtol=1e-5, atol=1e-5)


def _rl_job(tmp_path, base, demo_cache, *overrides):
    return load_config(RLJob, None, [
        f"run.output_dir={tmp_path}", "run.name=rl", "run.device=cpu", "run.seed=0",
        f"data.demo_cache={demo_cache}", "data.crop_size=32", "degradation.kind=bicubic",
        f"model.pretrained={base}", "lora.rank=4", "lora.alpha=8", "lora.kernel=addmm", "reward.name=ssim",
        "rl.group_size=4", "rl.inputs_per_iter=1", "rl.rollout_steps=3", "rl.iterations=1", "rl.eval_inputs=0",
        "rl.probe_every=0", "rl.save_every=0", "rl.micro_batch=8", *overrides])


def test_rl_iteration_runs_with_fp8_nograd(tmp_path, tiny_base, demo_cache, monkeypatch):
    from oars_fast.stages.rl import RLStage

    calls = {"fp8": 0, "grad": 0}
    real = fp8.fp8_linear

    def counting(*a, **k):
        calls["fp8"] += 1
        calls["grad"] += int(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(fp8, "fp8_linear", counting)
    st = RLStage(_rl_job(tmp_path, tiny_base, demo_cache, "rl.fp8_nograd=rollout_ref")).setup()
    layers = st.fp8_forwards.layers
    assert layers and all(m.fp8_quantizations == 1 for m in layers)  # quantised once, at setup
    for forward, on in (("rollout", True), ("ref", True), ("old", False)):  # v_old: never fp8
        with st._fp8(forward):
            assert all(m.fp8_on == on for m in layers), forward
    x, c, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])
    v_old, v_ref = st._v(x, t, c, "old"), st._v(x, t, c, "ref")
    f8, st.fp8_forwards = st.fp8_forwards, None  # the option off, same model
    assert torch.equal(st._v(x, t, c, "old"), v_old) and not torch.equal(st._v(x, t, c, "ref"), v_ref)
    st.fp8_forwards = f8
    calls["fp8"] = 0
    stats = st.train_iteration()
    assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("reward", "loss", "kl", "dv", "grad_norm"))
    assert calls["fp8"] > 0 and calls["grad"] == 0  # the no-grad forwards ran fp8, never a grad-enabled one
    assert all(m.fp8_quantizations == 1 for m in layers) and not any(m.fp8_on for m in layers)
    st.cleanup()


def test_refusals(monkeypatch):
    for mode in ("rollout", "rollout_ref"):
        with pytest.raises(ConfigError, match="NFT only.*flow_grpo"):
            load_config(RLJob, None, [f"rl.fp8_nograd={mode}", "rl.objective=flow_grpo"])
        load_config(RLJob, None, [f"rl.fp8_nograd={mode}"])  # NFT: fine
    with pytest.raises(ConfigError, match="rollout_ref"):  # v_old in fp8 is not offered
        load_config(RLJob, None, ["rl.fp8_nograd=all"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="sm_89 or newer.*sm_80"):
        fp8.check_support("cuda", torch.bfloat16)
    if CPU_ROWWISE:
        fp8.check_support("cpu", torch.float32)
    else:  # torch 2.11's CPU build: per-tensor scales only, said at setup
        with pytest.raises(ConfigError, match="on cpu with torch.float32 it fails.*per-tensor"):
            fp8.check_support("cpu", torch.float32)

    def unavailable(*a, **k):
        raise RuntimeError("_scaled_mm is not supported here")

    monkeypatch.setattr(torch, "_scaled_mm", unavailable)
    with pytest.raises(ConfigError, match="needs row-wise fp8 GEMMs.*not supported here"):
        fp8.check_support("cpu", torch.bfloat16)
