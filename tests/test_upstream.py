"""Our RL pieces against transcriptions of the reference code (tests/upstream_transcriptions.py; each
function there cites repository, file, function and commit): DiffusionNFT's loss with its scale, its
advantage -> r mapping, its training-time selection, its EMAs; Flow-GRPO's log-probability, surrogate
and KL; the Qwen-Image-Edit-Plus prompt. Our kernels and refs must agree with them, and our defaults
must be theirs (or listed in the README's deviation table)."""
import pytest
import torch
import upstream_transcriptions as up

from oars_fast import kernels as K
from oars_fast.config import LoRAConfig, RLJob, SamplerConfig
from oars_fast.kernels import _common
from oars_fast.models import text_encoder as te
from oars_fast.models.sampler import sde_step, sigma_schedule
from oars_fast.stages.rl import grpo_kl, grpo_surrogate, update_times


def _nft_inputs(seed, b=5, shape=(16, 6, 10)):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(b, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    x0, noise, v_old, v_ref = mk(), mk(), mk(), mk()
    v_theta = (v_old + 0.3 * mk()).requires_grad_()
    t = torch.rand(b, generator=g, dtype=torch.float64).clamp(0.05, 1.0)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    return v_theta, v_old, v_ref, x0, noise, t, r


@pytest.mark.parametrize("beta,kl", [(1.0, 0.0), (1.0, 1e-4), (0.1, 1e-4)])
def test_nft_loss_with_its_scale_matches_diffusionnft(beta, kl):
    v_theta, v_old, v_ref, x0, noise, t, r = _nft_inputs(0)
    ref_loss, _ = up.nft_loss(v_theta, v_old, v_ref if kl else None, x0, noise, t, r, beta=beta, kl_beta=kl,
                              adv_clip_max=5.0)
    (g_ref,) = torch.autograd.grad(ref_loss, v_theta)
    # ours: v_target = noise - x0, the policy term scaled by rl.adv_clip (5) as the RL stage passes it
    ours = K.nft_loss_ref(v_theta, v_old, noise - x0, t, r, beta, v_ref if kl else None, kl, policy_weight=5.0)
    (g_ours,) = torch.autograd.grad(ours, v_theta)
    # our reference computes in float32 (as the kernel does); the transcription keeps float64 inputs
    assert float(ours.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.skipif(not _common.use_triton(torch.zeros(1)), reason="Triton cannot run here")
def test_fused_nft_kernel_matches_diffusionnft():
    v_theta, v_old, v_ref, x0, noise, t, r = _nft_inputs(1)
    ref_loss, _ = up.nft_loss(v_theta, v_old, v_ref, x0, noise, t, r, beta=1.0, kl_beta=1e-4, adv_clip_max=5.0)
    (g_ref,) = torch.autograd.grad(ref_loss, v_theta)
    f32 = [x.detach().float() for x in (v_theta, v_old, v_ref, x0, noise, t, r)]
    vt = f32[0].clone().requires_grad_()
    with _common.backend("triton"):
        loss, _ = K.nft_loss_with_stats(vt, f32[1], f32[4] - f32[3], f32[5], f32[6], 1.0, f32[2], 1e-4,
                                        policy_weight=5.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    torch.testing.assert_close(vt.grad.double(), g_ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("global_std", [True, False])
def test_advantages_to_r_match_diffusionnft(global_std):
    g = torch.Generator().manual_seed(2)
    k, groups = 24, 6
    rewards = torch.rand(groups * k, generator=g)
    rewards[k:2 * k] = rewards[k:2 * k] * 0.1 + 0.5  # a narrow group
    adv = up.per_prompt_advantages(rewards, [i // k for i in range(groups * k)], global_std=global_std)
    r_up = up.nft_optimality_probability(adv, 5.0)
    r_ours, keep = K.group_advantages_ref(rewards, k, 5.0, 1e-4, global_std, 2.0, 0.0)  # filter off
    assert bool(keep.all())
    torch.testing.assert_close(r_ours.double(), r_up, rtol=0, atol=2e-7)
    # and back to the clipped advantage, as update_flow_grpo recovers it
    torch.testing.assert_close(((r_ours - 0.5) * 2 * 5.0).double(), adv.clamp(-5, 5), rtol=0, atol=2e-6)


@pytest.mark.parametrize("steps", [6, 10])
def test_update_times_are_diffusionnfts_selection(steps):
    """rl.train_timesteps=rollout: per candidate a permutation of the rollout's sigmas without the final 0,
    the first int(N * 0.99): DiffusionNFT's perms_time and num_train_timesteps, drawn from each
    candidate's own generator."""
    sigmas = sigma_schedule(steps, 1024, SamplerConfig())
    n = RLJob(rl=RLJob().rl.__class__(rollout_steps=steps)).rl.update_times
    assert n == up.nft_num_train_timesteps(steps, 0.99) == steps - 1
    seeds = [11, 12, 13]
    ours = update_times(seeds, sigmas, "rollout", n)
    for row, sd in zip(ours, seeds):
        idx = up.nft_select_time_indices(steps, 1, 0.99, generator=torch.Generator().manual_seed(sd))
        torch.testing.assert_close(row, up.nft_training_times(sigmas, idx)[0], rtol=0, atol=1e-7)
        assert len(set(row.tolist())) == n and 1.0 in sigmas[:-1].tolist()  # distinct grid times, t = 1 included


def test_flow_grpo_log_prob_surrogate_and_kl_match_flow_grpo():
    g = torch.Generator().manual_seed(3)
    sig = sigma_schedule(6, 1024, SamplerConfig())
    x = torch.randn(4, 16, 6, 6, generator=g)
    v, v_ref = torch.randn(4, 16, 6, 6, generator=g), torch.randn(4, 16, 6, 6, generator=g)
    for i in range(len(sig) - 2):  # every SDE step, the first (sigma = 1) included
        s, s_next = float(sig[i]), float(sig[i + 1])
        step = sde_step(x, v, s, s_next, float(sig[1]), 0.7, torch.randn(x.shape, generator=g))
        prev, lp, mean, std = up.flow_grpo_sde_step(x, v, sig.float(), i, 0.7, prev_sample=step.x_next)
        torch.testing.assert_close(step.log_prob, lp, rtol=0, atol=3e-6)
        torch.testing.assert_close(step.mean, mean, rtol=0, atol=3e-6)
        ref = sde_step(x, v_ref, s, s_next, float(sig[1]), 0.7, x_next=step.x_next)
        _, _, mean_ref, _ = up.flow_grpo_sde_step(x, v_ref, sig.float(), i, 0.7, prev_sample=step.x_next)
        kl_up = up.flow_grpo_kl(mean, mean_ref, std.reshape(-1, 1, 1, 1).expand(4, 1, 1, 1))
        assert float(grpo_kl(step, ref)) == pytest.approx(float(kl_up), rel=1e-4)
        old = lp + 0.05 * torch.randn(4, generator=g)
        adv = torch.randn(4, generator=g) * 4
        ours, _ = grpo_surrogate(step.log_prob, old, adv.clamp(-5, 5), 1e-4)
        theirs, _ = up.flow_grpo_policy_loss(lp, old, adv, 5.0, 1e-4)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)


def test_lora_ema_and_old_policy_decays_match_diffusionnft():
    rl = RLJob().rl
    for s in (0, 1, 5, 50, 499, 500, 501, 2000):
        assert rl.eta(s) == pytest.approx(up.nft_old_policy_decay(s, 1))
        assert min((1 + s) / (10 + s), rl.ema_max_decay) == up.ema_wrapper_decay(s, 0.9)


def test_edit_prompt_matches_the_edit_plus_pipeline():
    instr = "Restore this photo."
    assert te.EDIT_TEMPLATE.format(te.IMAGE_PROMPT + instr) == up.qwen_edit_plus_prompt_text(instr, 1)
    assert te.EDIT_DROP_TOKENS == up.QWEN_EDIT_PLUS_DROP_IDX and te.CONDITION_AREA == up.QWEN_CONDITION_IMAGE_AREA
    for w, h in ((128, 128), (160, 96), (37, 91), (512, 288)):
        assert te.condition_size(w, h) == up.qwen_calculate_dimensions(te.CONDITION_AREA, w / h)


def test_rl_defaults_are_the_references():
    """Every RL default equals the reference code's, except the deviations the README lists (Euler rollouts
    of 6 steps, the group filter)."""
    job = RLJob()
    rl, o, lora = job.rl, job.optim, LoRAConfig()
    assert (rl.train_timesteps, rl.timestep_fraction, rl.adv_clip, rl.beta) == ("rollout", up.NFT_TIMESTEP_FRACTION,
                                                                              up.NFT_ADV_CLIP_MAX, up.NFT_BETA)
    assert rl.kl == up.NFT_KL_BETA and rl.global_std and rl.ema and rl.ema_max_decay == 0.9
    assert (rl.eta_schedule, rl.eta_rate, rl.eta_max) == ("linear", 0.001, 0.5)
    grpo = RLJob(rl=rl.__class__(objective="flow_grpo")).rl
    assert grpo.kl == up.GRPO_KL_BETA and grpo.grpo_clip == up.GRPO_CLIP_RANGE and grpo.noise_level == \
        up.GRPO_NOISE_LEVEL
    assert (o.lr, o.weight_decay, o.betas, o.eps, o.grad_clip) == (3e-4, 1e-4, [0.9, 0.999], 1e-8, 1.0)
    assert (lora.rank, lora.alpha, lora.init, lora.init_peft) == (32, 64.0, "gaussian", "gaussian")
    assert sorted(lora.target_modules) == sorted(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                  "add_v_proj", "to_add_out"])
    assert rl.group_size == 24  # images per prompt
