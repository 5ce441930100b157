import math

import numpy as np
import pytest
import torch

from oars_fast.config import SamplerConfig
from oars_fast.models.sampler import calculate_mu, euler_sample, per_sample_noise, sde_step, sigma_schedule


def _qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                           max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


@pytest.mark.parametrize("steps", [2, 6, 40])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 8192])
def test_schedule_matches_diffusers_qwen_image(steps, seq_len):
    cfg = SamplerConfig()
    ours = sigma_schedule(steps, seq_len, cfg)
    sch = _qwen_scheduler()
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_mu(seq_len, cfg))
    assert len(ours) == steps + 1 and float(ours[-1]) == 0.0
    assert torch.allclose(ours.float(), sch.sigmas.float(), atol=1e-6)
    assert float(ours[-2]) == pytest.approx(0.02, abs=1e-9)


def test_one_step_schedule():
    assert sigma_schedule(1, 1024, SamplerConfig()).tolist() == [1.0, 0.0]


def test_schedule_variants_descend():
    for shift in ("dynamic", "fixed", "none"):
        s = sigma_schedule(10, 1024, SamplerConfig(shift=shift, shift_terminal=None))
        assert float(s[0]) == pytest.approx(1.0) and torch.all(s[1:] < s[:-1])


def test_euler_is_exact_on_the_single_point_flow():
    # for data = one point x0, the true velocity is (x - x0)/sigma and every Euler step is exact
    x0 = torch.randn(3, 4, 5, 6, dtype=torch.float64).float()
    noise = torch.randn_like(x0)
    for steps in (1, 6, 40):
        sig = sigma_schedule(steps, 1024, SamplerConfig())
        out = euler_sample(lambda x, s: (x - x0) / s.view(-1, 1, 1, 1), noise, sig)
        assert torch.allclose(out.x0, x0, atol=1e-5)


def test_euler_converges_to_the_linear_ode_solution():
    # dx/dsigma = -a x from sigma=1 to 0: x(0) = x(1) * exp(a); Euler error is O(1/N)
    a = 0.7
    x1 = torch.randn(2, 8)
    errs = []
    for steps in (50, 400):
        sig = sigma_schedule(steps, 1024, SamplerConfig(shift="none", shift_terminal=None))
        sig[-2] = sig[-2]  # linspace(1, 1/N) then 0
        out = euler_sample(lambda x, s: -a * x, x1, sig)
        errs.append(float((out.x0 - x1 * math.exp(a)).abs().max()))
    assert errs[1] < 0.01 * float(x1.abs().max()) * math.exp(a)
    assert errs[1] < errs[0] / 4  # first order: 8x the steps, ~8x smaller error


def test_matches_diffusers_scheduler_steps():
    sch = _qwen_scheduler()
    steps, seq = 6, 256
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_mu(seq, SamplerConfig()))
    w = torch.randn(8, 8) * 0.3
    vel = lambda x, s: torch.tanh(x @ w) + s.view(-1, 1)  # noqa: E731
    x = torch.randn(2, 8)
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(vel(ref, (t / 1000).expand(2)), t, ref).prev_sample
    ours = euler_sample(vel, x, sigma_schedule(steps, seq, SamplerConfig())).x0
    assert torch.allclose(ours, ref, atol=1e-5)


def test_per_sample_seeding_is_batch_independent():
    noise = per_sample_noise((4, 6), [3, 9], "cpu")
    assert torch.equal(noise[1], per_sample_noise((4, 6), [9], "cpu")[0])
    vel = lambda x, s: x * s.view(-1, 1, 1)  # noqa: E731
    sig = sigma_schedule(6, 64, SamplerConfig())
    both = euler_sample(vel, noise, sig, sde=True, seeds=[3, 9])
    one = euler_sample(vel, noise[1:], sig, sde=True, seeds=[9])
    assert torch.allclose(both.x0[1], one.x0[0], atol=1e-6)


def test_sde_first_step_noise_is_bounded_for_every_resolution():
    # at small token counts the float64 schedule starts at 1 - 1e-16, not 1: the noise must stay finite
    for seq in (16, 64, 1024, 4096):
        sig = sigma_schedule(6, seq, SamplerConfig())
        x = torch.zeros(1, 64)
        out = sde_step(x, torch.zeros_like(x), float(sig[0]), float(sig[1]), float(sig[1]), 0.7,
                       torch.ones_like(x)).x_next
        assert float(out.abs().max()) < 2.0, seq


def test_sde_explores_and_scores():
    sig = sigma_schedule(6, 64, SamplerConfig())
    vel = lambda x, s: 0.5 * x  # noqa: E731
    noise = per_sample_noise((16,), [0, 1], "cpu")
    ode = euler_sample(vel, noise, sig)
    sde = euler_sample(vel, noise, sig, sde=True, noise_level=0.7, seeds=[0, 1], keep_trajectory=True)
    assert not torch.allclose(ode.x0, sde.x0)
    assert sde.log_probs.shape == (2, 5)  # the last step (to sigma = 0) is deterministic
    x, x_next = sde.trajectory[1], sde.trajectory[2]
    lp = sde_step(x, vel(x, None), float(sig[1]), float(sig[2]), float(sig[1]), 0.7, x_next=x_next).log_prob
    assert torch.allclose(lp, sde.log_probs[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        euler_sample(vel, noise, sig, sde=True)
