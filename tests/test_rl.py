"""Online RL on the tiny model (CPU): rollouts, grouping and filtering, adapters, EMA, learning.

The LoRA runs through peft here (lora.kernel=peft): the fused op under the Triton interpreter is
correct (test_lora.py) but far too slow for training loops on a CPU."""
import pytest
import torch

from oars_fast.config import RLJob, SFTJob, load_config
from oars_fast.stages.rl import RLStage
from oars_fast.stages.sft import SFTStage


@pytest.fixture(scope="module")
def policy_base(tmp_path_factory, tiny_base, demo_cache):
    """tiny_base + a short generic (bicubic) pre-training: a base whose samples mean something."""
    out = tmp_path_factory.mktemp("rl-base")
    job = load_config(SFTJob, None, [f"run.output_dir={out}", "run.name=b", "run.device=cpu",
                                     f"data.demo_cache={demo_cache}", "data.crop_size=32", "data.batch_size=8",
                                     f"model.pretrained={tiny_base}", "degradation.kind=bicubic",
                                     "sft.latent_pool=256", "sft.steps=200", "optim.lr=2e-3", "sft.sample_every=0",
                                     "sft.save_every=0", "sft.timestep_sampling=uniform"])
    stage = SFTStage(job).setup()
    stage.train()
    stage.cleanup()
    return out / "b" / "model"


def _job(tmp_path, base, demo_cache, *overrides):
    return load_config(RLJob, None, [
        f"run.output_dir={tmp_path}", "run.name=rl", "run.device=cpu", "run.seed=0",
        f"data.demo_cache={demo_cache}", "data.crop_size=32", "degradation.kind=bicubic",
        f"model.pretrained={base}", "lora.rank=4", "lora.alpha=8", "lora.kernel=peft", "optim.lr=2e-3",
        "reward.name=ssim",
        "rl.group_size=4", "rl.inputs_per_iter=2", "rl.rollout_steps=4", "rl.iterations=2", "rl.eval_inputs=4",
        "rl.probe_every=0", "rl.save_every=0", "rl.micro_batch=8", *overrides])


def test_rollout_shapes_and_grouping(tmp_path, policy_base, demo_cache):
    st = RLStage(_job(tmp_path, policy_base, demo_cache)).setup()
    lr, gt = st.eval_set.lr[:3], st.eval_set.hr[:3]
    ro = st.rollout(lr, gt, seed=1)
    assert ro.x0.shape == (12, 16, 8, 8) and ro.images.shape == (12, 3, 32, 32) and ro.cond.latents.shape == ro.x0.shape
    assert ro.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(ro.lr[5], lr[1]) and ro.trajectory is None and ro.log_probs is None
    assert not torch.allclose(ro.x0[0], ro.x0[1])  # K different seeds, K different candidates
    again = st.rollout(lr[1:2], gt[1:2], seed=1)
    assert not torch.allclose(again.x0[0], ro.x0[4])  # seeds depend on the row, not only the input
    sde = st.rollout(lr, gt, seed=1, sde=True)
    assert len(sde.trajectory) == 5 and sde.log_probs.shape == (12, 3)
    st.cleanup()


def test_saturated_groups_are_dropped(tmp_path, policy_base, demo_cache):
    st = RLStage(_job(tmp_path, policy_base, demo_cache)).setup()

    def fake_reward(lr, sr, gt, gi):  # group 0 saturated (mean .95, std ~0), group 1 informative
        return torch.where(gi == 0, 0.95, torch.linspace(0.1, 0.9, len(gi))), {}

    st.reward_fn = fake_reward
    stats = st.train_iteration()
    assert stats["groups_dropped"] == 1 and stats["kept"] == pytest.approx(0.5)
    st.cleanup()


def test_adapter_switching_and_old_policy_ema(tmp_path, policy_base, demo_cache):
    st = RLStage(_job(tmp_path, policy_base, demo_cache)).setup()
    pol = st.policy
    with torch.no_grad():
        for old, cur in pol._pairs():
            cur.normal_(0, 0.2)
            old.normal_(0, 0.2)
    x, c, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        v_cur = st.model.velocity(x, t, c)
        with pol.use("old"):
            v_old = st.model.velocity(x, t, c)
        with pol.use("ref"):
            v_ref = st.model.velocity(x, t, c)
        back = st.model.velocity(x, t, c)
    assert not torch.allclose(v_cur, v_old) and not torch.allclose(v_cur, v_ref) and not torch.allclose(v_old, v_ref)
    assert torch.equal(back, v_cur)  # each switch returns to the current adapter
    assert all(p.requires_grad for p in pol.named_parameters().values())
    assert not any(o.requires_grad for o, _ in pol._pairs())
    before = [(o.clone(), c.clone()) for o, c in pol._pairs()]
    pol.ema_update(0.3)
    for (o0, c0), (o1, c1) in zip(before, pol._pairs()):
        assert torch.allclose(o1, 0.3 * o0 + 0.7 * c0) and torch.equal(c1, c0)
    assert st.job.rl.eta(3) == pytest.approx(0.003) and st.job.rl.eta(10**6) == 0.5
    st.cleanup()


@pytest.mark.parametrize("objective", ["nft", "flow_grpo"])
def test_rl_raises_held_out_reward(tmp_path, policy_base, demo_cache, objective):
    # a reward with room to move whatever the base (mean brightness, conftest.BrightnessReward: SSIM
    # against the tiny base has too little room for a short CPU run to show reliably); per-group std,
    # 4 times per candidate; held-out evaluation is deterministic (fixed seeds, ODE)
    job = _job(tmp_path, policy_base, demo_cache, f"rl.objective={objective}", "rl.iterations=25",
               "rl.group_size=8", "rl.eval_inputs=8", "rl.save_every=25", "optim.lr=2e-3", "rl.grpo_clip=0.2",
               "rl.global_std=false", "rl.timesteps_per_sample=4", "rl.mode=nr", "reward.name=custom",
               "reward.custom=conftest:brightness_reward_factory")
    st = RLStage(job).setup()
    st.train()
    st.cleanup()
    before, after = st.eval_before, st.eval_after  # of the exported (EMA) LoRA
    print(f"{objective}: held-out brightness reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.1, (before, after)
    assert (tmp_path / "rl" / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "rl" / "checkpoints" / "step_000025" / "COMPLETE").is_file()


def test_custom_reward_from_config(tmp_path, policy_base, demo_cache):
    job = _job(tmp_path, policy_base, demo_cache, "rl.mode=nr", "reward.name=custom",
               "reward.custom=conftest:lr_reward_factory", "rl.iterations=1", "rl.eval_inputs=0")
    st = RLStage(job).setup()
    stats = st.train_iteration()
    st.cleanup()
    assert "reward_part/lr_l1" in stats


def test_bf16_base_keeps_float32_lora_master_weights(tmp_path, policy_base, demo_cache):
    """model.dtype=bf16: the frozen base is stored in bf16 (half the memory of a float32 copy), the LoRA
    (current and old) in float32; compute under bf16 autocast; one iteration gives finite numbers."""
    st = RLStage(_job(tmp_path, policy_base, demo_cache, "model.dtype=bf16", "rl.iterations=1")).setup()
    tr = st.model.transformer
    assert {p.dtype for n, p in tr.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in tr.named_parameters() if "lora_" in n} == {torch.float32}
    stats = st.train_iteration()
    st.cleanup()
    assert torch.isfinite(torch.tensor([stats["loss"], stats["grad_norm"], stats["reward"]])).all()
    assert stats["grad_norm"] > 0


def test_flow_grpo_is_on_policy_and_nft_trains_on_the_rollout_grid(tmp_path, policy_base, demo_cache):
    """Flow-GRPO samples from the current policy, so every ratio of an iteration's update starts at 1 and
    the old adapter is left alone; NFT trains each kept candidate at int(N * 0.99) of the rollout's sigmas."""
    st = RLStage(_job(tmp_path, policy_base, demo_cache, "rl.objective=flow_grpo", "rl.iterations=1",
                      "rl.filter_mean=2.0")).setup()
    old = [o.clone() for o, _ in st.policy._pairs()]
    stats = st.train_iteration()
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-4) and stats["clipfrac"] == 0.0
    assert stats["update_times"] == 3 and stats["eta"] == 0.0  # the 3 SDE steps of a 4-step rollout
    assert all(torch.equal(a, o) for a, (o, _) in zip(old, st.policy._pairs()))
    st.cleanup()
    st = RLStage(_job(tmp_path, policy_base, demo_cache, "run.name=nft", "rl.iterations=1",
                      "rl.filter_mean=2.0")).setup()
    stats = st.train_iteration()
    assert stats["update_times"] == 3 and stats["kl"] == 0.0  # int(4 * 0.99); B starts at 0: v_theta = v_ref
    st.cleanup()


def test_edit_conditioning_is_computed_once_per_group(tmp_path, demo_cache):
    """model.condition=edit: each LR input's prompt (the image inside the tiny Qwen2.5-VL) is computed once and
    shared by its K candidates; different inputs get different prompts; an iteration trains."""
    from oars_fast.config import ModelConfig
    from oars_fast.models.backbone import build_tiny

    build_tiny(ModelConfig(condition="edit", tiny={"num_layers": 1}), seed=0).save_pretrained(tmp_path / "edit")
    st = RLStage(_job(tmp_path, tmp_path / "edit", demo_cache, "rl.iterations=1", "rl.filter_mean=2.0")).setup()
    assert st.model.condition_kind == "edit"
    ro = st.rollout(st.eval_set.lr[:2], st.eval_set.hr[:2], seed=1)
    p = ro.cond.prompt
    assert p.shape[0] == 8 and torch.equal(p[0], p[3]) and not torch.allclose(p[0], p[4])
    stats = st.train_iteration()
    assert stats["cond_s"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))
    st.cleanup()


def test_a_compass_variant_is_evaluated_with_the_full_reward(tmp_path, policy_base, demo_cache):
    """reward.compass_variant=dq_only trains on Q_SR - Q_LR, but the held-out score is the full COMPASS R from the
    same loaded model, so dq_only and full runs compare."""
    from oars_fast.rewards.compass import CompassModel, CompassReward

    CompassModel.random(dtype=torch.float32, device="cpu").save_pretrained(tmp_path / "compass")
    st = RLStage(_job(tmp_path, policy_base, demo_cache, "rl.mode=nr", "reward.name=compass",
                      f"reward.compass={tmp_path / 'compass'}", "reward.compass_variant=dq_only")).setup()
    assert st.reward_fn.variant == "dq_only" and st.eval_reward_fn.variant == "full"
    assert st.eval_reward_fn.model is st.reward_fn.model  # not loaded twice
    ro = st.rollout(st.eval_set.lr, st.eval_set.hr, seed=3, policy="current", k=4, sde=False)
    full = CompassReward(st.reward_fn.model, "full")(ro.lr, ro.images, ro.gt, ro.group_index)[0]
    dq = st.reward_fn(ro.lr, ro.images, ro.gt, ro.group_index)[0]
    assert not torch.allclose(full, dq)
    evaluated = []
    st.rollout = lambda *a, **k: evaluated.append(k) or ro  # the evaluation's own rollout: the one scored above
    assert st.evaluate() == pytest.approx(float(full.mean()), abs=1e-6)
    assert evaluated and evaluated[0]["sde"] is False
    st.cleanup()
