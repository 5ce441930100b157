"""The speed levers of the RL update (issue "Fast on Hopper"), each behind a config option, on the tiny
model (CPU): how often the reference forward runs (rl.ref_every), regional torch.compile of the
transformer blocks (model.compile), selective activation checkpointing (model.checkpointing) and the
attention backend (model.attention_backend).

The LoRA runs through peft here (lora.kernel=peft), as in test_rl.py."""

import pytest
import torch

import oars_fast.stages.rl as rl_module
from oars_fast.config import ConfigError, RLJob, load_config
from oars_fast.kernels import nft_loss_with_stats
from oars_fast.models.sampler import per_sample_noise, sde_step
from oars_fast.runtime.seeding import derive_seeds
from oars_fast.stages.rl import RLStage, grpo_kl, grpo_surrogate, ref_terms, update_times


def _job(tmp_path, demo_cache, *overrides):
    return load_config(
        RLJob,
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=levers",
            "run.device=cpu",
            "run.seed=0",
            f"data.demo_cache={demo_cache}",
            "data.crop_size=32",
            "degradation.kind=bicubic",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.kernel=peft",
            "reward.name=ssim",
            "rl.group_size=4",
            "rl.inputs_per_iter=2",
            "rl.rollout_steps=4",
            "rl.iterations=1",
            "rl.eval_inputs=0",
            "rl.probe_every=0",
            "rl.save_every=0",
            "rl.micro_batch=3",  # 8 rows -> micro-batches of 3, 3, 2: partial reference sub-batches happen
            "rl.kl_weight=1.0",  # a KL large enough to show in the gradient
            *overrides,
        ],
    )


def _stage(tmp_path, demo_cache, *overrides):
    """A set-up stage whose current and old adapters differ from each other and from the base (so v_theta,
    v_old and v_ref all differ), and one rollout with random r."""
    st = RLStage(_job(tmp_path, demo_cache, *overrides)).setup()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for old, cur in st.policy._pairs():
            cur.copy_(torch.randn(cur.shape, generator=g) * 0.2)
            old.copy_(torch.randn(old.shape, generator=g) * 0.2)
    batch = next(st._iter)
    lr = st.degrade(batch["hr"], seeds=derive_seeds(batch["seed"].tolist(), 0))
    sde = st.job.rl.objective == "flow_grpo"
    ro = st.rollout(lr, batch["hr"], seed=7, policy="current" if sde else "old")
    n = ro.x0.shape[0]
    r = torch.rand(n, generator=g)
    idx = torch.arange(n)
    return st, ro, r, idx, idx.clone()


def _grads(st) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in st.params.values()]
    for p in st.params.values():
        p.grad = None
    return out


# ------------------------------------------------------------------------------------------------
# The update loops as they were before rl.ref_every (transcribed from oars_fast/stages/rl.py): with
# ref_every = 1 the new code must give exactly these losses, stats and gradients.
# ------------------------------------------------------------------------------------------------


def _update_nft_before(self, ro, r, idx, ids) -> dict:
    rl = self.job.rl
    passes = rl.update_times
    items, n_global = self._work(len(idx), passes)
    n_terms = n_global * passes
    seeds_t = derive_seeds(ids[idx].tolist(), self.job.run.seed, rl_module._UPDATE, self.step)
    times = update_times(seeds_t, ro.sigmas, rl.train_timesteps, passes).to(self.device)
    sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "kl": 0.0, "dv": 0.0}
    for n, (tau, sl) in enumerate(items):
        j, real = self._rows(idx, sl)
        x0, cond, rr = ro.x0[j], ro.cond[j], r[j]
        t = times[sl, tau] if real else torch.full((1,), 0.5, device=self.device)
        seeds = derive_seeds(ids[j].tolist(), self.job.run.seed, rl_module._UPDATE, self.step, tau)
        eps = per_sample_noise(tuple(x0.shape[1:]), derive_seeds(seeds, rl_module._NOISE), self.device)
        tb = t.view(-1, 1, 1, 1)
        x_t, v_target = (1 - tb) * x0 + tb * eps, eps - x0
        v_old = self._v(x_t, t, cond, "old")
        v_ref = self._v(x_t, t, cond, "ref") if rl.kl > 0 else None
        v_theta = self._v(x_t, t, cond, None)
        loss, st = nft_loss_with_stats(
            v_theta, v_old, v_target, t, rr, rl.beta, v_ref, rl.kl, policy_weight=rl.adv_clip
        )
        w = len(j) / n_terms if real else 0.0
        self.engine.backward(loss * (w * self.dist.world), last=n == len(items) - 1)
        sums["loss"] += float(loss.detach()) * w
        for key in ("pos", "neg", "kl"):
            sums[key] += float(st[key]) * w
        sums["dv"] += float((v_theta.detach().float() - v_old.float()).abs().mean()) * w
    return self._reduce(sums)


def _update_flow_grpo_before(self, ro, r, idx, ids) -> dict:
    rl = self.job.rl
    adv = (r - 0.5) * 2 * rl.adv_clip
    sig = ro.sigmas
    steps = ro.log_probs.shape[1]
    items, n_global = self._work(len(idx), steps)
    n_terms = n_global * steps
    sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "clipfrac": 0.0}
    for n, (i, sl) in enumerate(items):
        j, real = self._rows(idx, sl)
        s, s_next = float(sig[i]), float(sig[i + 1])
        x, x_next, cond = ro.trajectory[i][j], ro.trajectory[i + 1][j], ro.cond[j]
        t = torch.full((len(j),), s, device=self.device)
        step = sde_step(x, self._v(x, t, cond, None).float(), s, s_next, float(sig[1]), rl.noise_level, x_next=x_next)
        loss, ratio = grpo_surrogate(step.log_prob, ro.log_probs[j, i], adv[j], rl.grpo_clip)
        kl = torch.zeros((), device=self.device)
        if rl.kl > 0:
            ref = sde_step(
                x, self._v(x, t, cond, "ref").float(), s, s_next, float(sig[1]), rl.noise_level, x_next=x_next
            )
            kl = grpo_kl(step, ref)
            loss = loss + rl.kl * kl
        w = len(j) / n_terms if real else 0.0
        self.engine.backward(loss * (w * self.dist.world), last=n == len(items) - 1)
        sums["loss"] += float(loss.detach()) * w
        sums["kl"] += float(kl.detach()) * w
        sums["ratio"] += float(ratio.detach().mean()) * w
        sums["clipfrac"] += float(((ratio - 1).abs() > rl.grpo_clip).float().mean()) * w
    return self._reduce(sums)


def _update(st, ro, r, idx, ids):
    if st.job.rl.objective == "nft":
        return st.update_nft(ro, r, idx, ids)
    return st.update_flow_grpo(ro, r, idx, ids)


def _count_ref(st, monkeypatch) -> list[int]:
    """Counts the reference forwards (calls of the velocity with the adapters off) and their rows."""
    counts = [0, 0]
    inner = st._v

    def counted(x_t, t, cond, policy):
        if policy == "ref":
            counts[0] += 1
            counts[1] += x_t.shape[0]
        return inner(x_t, t, cond, policy)

    monkeypatch.setattr(st, "_v", counted)
    return counts


# ------------------------------------------------------------------------------------------------
# 1. rl.ref_every
# ------------------------------------------------------------------------------------------------


def test_ref_terms_select_each_term_with_probability_one_over_n():
    for n in (2, 3, 4):
        m = ref_terms(list(range(4000)), 5, n)
        assert m.shape == (4000, 5) and m.dtype == torch.bool
        assert m.float().mean(0).sub(1 / n).abs().max() < 0.03  # every pass chosen with probability 1/N
        # systematic sampling: per candidate, floor(5 / N) or ceil(5 / N) passes
        assert set(m.sum(1).tolist()) <= {5 // n, -(-5 // n)}
    # over the N offsets every (candidate, pass) term is chosen exactly once: the N-weighted sum is the full KL
    p = torch.arange(5)
    assert torch.equal(sum(((p + o) % 4 == 0).long() for o in range(4)), torch.ones(5, dtype=torch.long))
    assert ref_terms([1, 2], 5, 1).all()
    assert torch.equal(ref_terms([11, 12, 13], 5, 3), ref_terms([11, 12, 13], 5, 3))  # deterministic


def test_ref_every_is_validated():
    with pytest.raises(ConfigError, match="ref_every"):
        load_config(RLJob, None, ["rl.ref_every=0"])
    assert load_config(RLJob, None, []).rl.ref_every == 1


@pytest.mark.parametrize("objective", ["nft", "flow_grpo"])
def test_ref_every_1_is_bit_identical_to_the_previous_update(tmp_path, demo_cache, objective, monkeypatch):
    st, ro, r, idx, ids = _stage(tmp_path, demo_cache, f"rl.objective={objective}")
    counts = _count_ref(st, monkeypatch)
    new = _update(st, ro, r, idx, ids)
    g_new = _grads(st)
    new_counts = list(counts)
    before = (_update_nft_before if objective == "nft" else _update_flow_grpo_before)(st, ro, r, idx, ids)
    g_before = _grads(st)
    assert {k: new[k] for k in before} == before  # loss, kl, ... exactly
    assert all(torch.equal(a, b) for a, b in zip(g_new, g_before))
    assert any(bool(g.abs().sum() > 0) for g in g_new)
    passes = 3  # the 3 update times (NFT) or SDE steps (Flow-GRPO) of a 4-step rollout
    assert new["ref_forwards"] == new_counts[0] == passes * 3  # 3 micro-batches of 3, 3, 2 rows per pass
    assert new["ref_rows"] == new_counts[1] == passes * 8
    st.cleanup()


@pytest.mark.parametrize("objective", ["nft", "flow_grpo"])
def test_ref_every_n_runs_fewer_reference_forwards_and_keeps_the_kl_in_expectation(
    tmp_path, demo_cache, objective, monkeypatch
):
    """With N = 4 about a quarter of the (candidate, pass) terms run the reference. The estimator's
    expectation is checked exactly: the selection is driven through each of its N offsets in turn (every
    term is selected under exactly one), and the mean over the offsets of the logged KL and of the
    gradient equals the full (ref_every = 1) KL and gradient."""
    st, ro, r, idx, ids = _stage(tmp_path, demo_cache, f"rl.objective={objective}")
    full = _update(st, ro, r, idx, ids)
    g_full = _grads(st)

    n = 4
    st.job.rl.ref_every = n
    counts = _count_ref(st, monkeypatch)
    seeded = _update(st, ro, r, idx, ids)  # the seeded selection
    _grads(st)
    assert seeded["ref_forwards"] == counts[0] < full["ref_forwards"]
    assert seeded["ref_rows"] == counts[1] < full["ref_rows"] / 2
    expected = st._ref_terms(ids[idx], 3)
    assert int(expected.sum()) == seeded["ref_rows"]
    assert seeded["loss"] != full["loss"]  # the estimate differs from the full KL on a given draw

    kls, grads = [], []
    for o in range(n):
        monkeypatch.setattr(
            rl_module,
            "ref_terms",
            lambda seeds, passes, every, o=o: (
                ((torch.arange(passes) + o) % every == 0).expand(len(seeds), passes).clone()
            ),
        )
        out = _update(st, ro, r, idx, ids)
        kls.append(out["kl"])
        grads.append(_grads(st))
        assert out["ref_rows"] == 8 * int(((torch.arange(3) + o) % n == 0).sum())
    assert sum(kls) / n == pytest.approx(full["kl"], rel=1e-5)
    for k, g in enumerate(g_full):
        mean = sum(gs[k] for gs in grads) / n
        assert torch.allclose(mean, g, rtol=1e-4, atol=1e-7), (k, (mean - g).abs().max())
    st.cleanup()


def test_ref_every_without_kl_runs_no_reference(tmp_path, demo_cache, monkeypatch):
    st, ro, r, idx, ids = _stage(tmp_path, demo_cache, "rl.kl_weight=0", "rl.ref_every=4")
    counts = _count_ref(st, monkeypatch)
    out = st.update_nft(ro, r, idx, ids)
    assert counts == [0, 0] and out["ref_forwards"] == 0 and out["kl"] == 0.0
    st.cleanup()


# ------------------------------------------------------------------------------------------------
# 2. model.compile=blocks
# ------------------------------------------------------------------------------------------------


def _policy_model(**model_cfg):
    """A 1-block tiny model (random weights, fixed seed) loaded with `model_cfg`, LoRA injected after loading
    (as the RL stage does), current and old adapters set to fixed non-zero weights."""
    from oars_fast.config import LoRAConfig, ModelConfig
    from oars_fast.models.backbone import load_backbone
    from oars_fast.models.lora import PolicyAdapters, use_lora_kernel

    model = load_backbone(ModelConfig(tiny={"num_layers": 1}, **model_cfg), device="cpu", seed=0)
    policy = PolicyAdapters(model.transformer, LoRAConfig(rank=4, alpha=8))
    use_lora_kernel(model.transformer, "peft")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for old, cur in policy._pairs():
            cur.copy_(torch.randn(cur.shape, generator=g) * 0.2)
            old.copy_(torch.randn(old.shape, generator=g) * 0.2)
    return model, policy


def _velocity_and_grads(model, policy, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, lr_latents = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    params = policy.named_parameters()
    for p in params.values():
        p.grad = None
    v = model.velocity(x, t, lr_latents)
    v.square().mean().backward()
    # a LoRA whose output is unused (the last block's text stream) has no gradient in eager mode, a zero one compiled
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
    with torch.no_grad(), policy.use("ref"):
        v_ref = model.velocity(x, t, lr_latents)
    return v.detach(), grads, v_ref


def test_compile_blocks_matches_eager(caplog):
    """Regional compile (inductor on this machine's C++ compiler) gives the eager outputs and LoRA gradients
    within float tolerance, with the LoRA injected after the compile call (compilation is lazy)."""
    import logging

    eager = _velocity_and_grads(*_policy_model())
    with caplog.at_level(logging.INFO, logger="oars_fast.models.backbone"):
        model, policy = _policy_model(compile="blocks")
    assert "1 transformer blocks compiled" in caplog.text
    try:
        compiled = _velocity_and_grads(model, policy)
    except Exception as e:  # inductor needs a working C++ toolchain on the CPU
        if "BackendCompilerFailed" in type(e).__name__ or "InductorError" in type(e).__name__:
            pytest.skip(f"torch.compile (inductor) cannot compile on this machine: {str(e).splitlines()[0]}")
        raise
    assert torch.allclose(compiled[0], eager[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(compiled[2], eager[2], atol=1e-5, rtol=1e-4)
    assert any(bool(g.abs().sum() > 0) for g in eager[1].values())
    for k, g in eager[1].items():
        assert torch.allclose(compiled[1][k], g, atol=1e-7, rtol=1e-4), k


# ------------------------------------------------------------------------------------------------
# 3. model.checkpointing
# ------------------------------------------------------------------------------------------------


def test_checkpointing_field_and_deprecated_alias():
    from oars_fast.config import ModelConfig

    assert ModelConfig().recompute == "none"
    assert ModelConfig(gradient_checkpointing=True).recompute == "full"  # the shipped qwen_image_edit YAMLs
    assert ModelConfig(gradient_checkpointing=True, checkpointing="attention").recompute == "attention"
    assert ModelConfig(checkpointing="mlp").recompute == "mlp"
    with pytest.raises(ConfigError, match="checkpointing"):
        ModelConfig(checkpointing="blocks")
    job = load_config(RLJob, "configs/qwen_image_edit/rl_fr.yaml", ["model.checkpointing=attention"])
    assert job.model.recompute == "attention"


@pytest.mark.parametrize("mode", ["full", "attention", "mlp"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(mode):
    from oars_fast.models.backbone import _Recompute

    base = _velocity_and_grads(*_policy_model(checkpointing="none"))
    model, policy = _policy_model(checkpointing=mode)
    block = model.transformer.transformer_blocks[0]
    hooked = {
        name
        for name in ("attn", "img_mlp", "txt_mlp")
        if hasattr(getattr(block, name), "_diffusers_hook")
        and getattr(block, name)._diffusers_hook.get_hook(_Recompute.NAME) is not None
    }
    assert hooked == {"full": set(), "attention": {"attn"}, "mlp": {"img_mlp", "txt_mlp"}}[mode]
    assert model.transformer.gradient_checkpointing == (mode == "full")
    # state-dict keys (and so peft / diffusers checkpoints) are those of the model without checkpointing
    assert set(model.transformer.state_dict()) == set(_policy_model()[0].transformer.state_dict())
    calls = {"attn": 0, "mlp": 0}
    block.attn.to_q.register_forward_pre_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
    block.img_mlp.net[2].register_forward_pre_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    ckpt = _velocity_and_grads(model, policy)
    # the forward with grad, the reference forward without, and the recompute in backward where checkpointed
    assert calls == {"attn": 2 + (mode in ("full", "attention")), "mlp": 2 + (mode in ("full", "mlp"))}
    assert torch.equal(ckpt[0], base[0]) and torch.equal(ckpt[2], base[2])
    for k, g in base[1].items():
        assert torch.allclose(ckpt[1][k], g, atol=1e-8, rtol=1e-6), k


# ------------------------------------------------------------------------------------------------
# 4. model.attention_backend
# ------------------------------------------------------------------------------------------------


def test_attention_auto_on_the_cpu_is_sdpa_and_logged(caplog):
    import logging

    from oars_fast.models.backbone import choose_attention

    assert choose_attention("auto", "cpu", "fp32")[0] == "sdpa"
    assert choose_attention("auto", "cpu", "bf16")[0] == "sdpa"
    assert choose_attention("native", "cpu", "fp32")[0] == "sdpa"  # diffusers' name, kept for old configs
    with caplog.at_level(logging.INFO, logger="oars_fast.models.backbone"):
        model, _ = _policy_model()
    assert model.attention_backend == "sdpa"
    assert [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()] == [
        "attention backend: sdpa (auto: no CUDA device (cpu): PyTorch SDPA)"
    ]


def test_attention_auto_on_gpus(monkeypatch):
    """auto's choice on CUDA devices (the probes are faked: this machine has no GPU)."""
    import oars_fast.models.backbone as bb

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    for capability, flash, expected in [
        ((9, 0), True, "cudnn"),
        ((9, 0), False, "cudnn"),
        ((8, 0), True, "flash"),
        ((8, 0), False, "sdpa"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(bb, "_flash_attn_installed", lambda f=flash: f)
        backend, reason = bb.choose_attention("auto", "cuda", "bf16")
        assert backend == expected, (capability, flash, reason)
        assert bb.choose_attention("auto", "cuda", "fp32")[0] == "sdpa"  # the fast kernels need bf16/fp16


@pytest.mark.parametrize("choice", ["cudnn", "flash", "sage"])
def test_attention_unavailable_choice_is_a_config_error(choice, monkeypatch):
    import oars_fast.models.backbone as bb
    from oars_fast.config import ModelConfig
    from oars_fast.models.backbone import load_backbone

    with pytest.raises(ConfigError, match=f"model.attention_backend={choice} needs a CUDA device"):
        load_backbone(ModelConfig(tiny={"num_layers": 1}, attention_backend=choice), device="cpu")
    if choice != "sage":
        with pytest.raises(ConfigError, match="bf16 or fp16"):
            bb.choose_attention(choice, "cuda", "fp32")
    monkeypatch.setattr(bb, "_flash_attn_installed", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn package is not installed"):
        bb.choose_attention("flash", "cuda", "bf16")
    with pytest.raises(ConfigError, match="attention_backend"):
        ModelConfig(attention_backend="xformers")


def test_an_unpadded_prompt_mask_is_dropped_and_a_padded_one_kept():
    """An all-ones prompt mask is dropped before the transformer (the same attention, and kernels without
    mask support such as flash-attn 2 can run); a padded one is kept, and refused under flash."""
    from oars_fast.errors import UserError
    from oars_fast.models.backbone import Condition

    model, _ = _policy_model()
    g = torch.Generator().manual_seed(0)
    x, lat, t = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.2, 0.6])
    seen = []
    model.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states_mask"]), with_kwargs=True
    )
    prompt = torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        v = model.velocity(x, t, Condition(lat, prompt, torch.ones(2, 8, dtype=torch.long)))
        padded = torch.ones(2, 8, dtype=torch.long)
        padded[1, 6:] = 0
        v_pad = model.velocity(x, t, Condition(lat, prompt, padded))
        direct = model.velocity(x, t, Condition(lat, prompt[:, :6], torch.ones(2, 6, dtype=torch.long)))
    assert seen[0] is None and seen[1] is not None
    assert torch.allclose(v_pad[0], v[0], atol=1e-6) and not torch.allclose(v_pad[1], v[1], atol=1e-4)
    assert torch.allclose(v_pad[1], direct[1], atol=1e-5)  # padding masked out = the shorter prompt
    model.attention_backend = "flash"
    with pytest.raises(UserError, match="flash-attn 2 takes no attention mask"):
        model.velocity(x, t, Condition(lat, prompt, padded))
