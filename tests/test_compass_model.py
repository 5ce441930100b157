"""COMPASS model and reward on tiny random Qwen-VL models (float32, CPU; the whole file runs in well under a minute).

Tolerances: prefix-reuse scoring vs full-sequence scoring and batched vs one-at-a-time agree to 1e-5 absolute
(observed ~5e-7: only the order of float32 reductions differs); a deliberately wrong suffix position id moves the
Qwen3-VL scores by > 1e-3, so the tolerance is meaningful.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oars_fast.errors import MissingFileError, UserError
from oars_fast.kernels import compass_reward_ref
from oars_fast.rewards.compass import (
    HEAD_FILE,
    CompassConfig,
    CompassModel,
    CompassReward,
    fit_size,
    reward_range,
)

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest, and on a shared CPU spinning OpenMP threads slow them 10-100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qwen3():
    return CompassModel.tiny("qwen3vl")


@pytest.fixture(scope="module")
def qwen25():
    return CompassModel.tiny("qwen2.5vl")


def _batch(g=3, k=(2, 3, 1), lr_hw=(16, 20), sr_hw=(64, 56), seed=0):
    gen = torch.Generator().manual_seed(seed)
    lr = torch.rand(g, 3, *lr_hw, generator=gen)
    gi = torch.cat([torch.full((n,), i) for i, n in enumerate(k)])
    gi = gi[torch.randperm(len(gi), generator=gen)]  # candidates of a group need not be contiguous
    sr = torch.rand(len(gi), 3, *sr_hw, generator=gen)
    return lr, sr, gi


def _close(a, b, tol=TOL):
    return all(torch.allclose(x, y, atol=tol, rtol=0) for x, y in zip(a, b))


def test_forward_shapes_ranges_and_gradients(qwen3):
    lr, sr, gi = _batch()
    qwen3.zero_grad()
    out = qwen3(lr[gi], sr)
    for k in ("f", "q_lr", "q_sr"):
        assert out[k].shape == (len(gi),) and out[k].dtype == torch.float32 and out[k].requires_grad
    assert bool(((out["f"] >= 0) & (out["f"] <= 1)).all())
    for k in ("q_lr", "q_sr"):
        assert bool(((out[k] >= 1) & (out[k] <= 5)).all())
    (out["f"].sum() + out["q_lr"].sum() + out["q_sr"].sum()).backward()
    bb = qwen3.backbone.model
    params = {"lr_head": qwen3.lr_head[0].weight, "pair_head": qwen3.pair_head[0].weight,
              "first text layer": bb.language_model.layers[0].mlp.down_proj.weight,
              "last text layer": bb.language_model.layers[-1].self_attn.q_proj.weight,
              "vision tower": bb.visual.blocks[0].mlp.linear_fc1.weight}
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    qwen3.zero_grad(set_to_none=True)


def test_q_lr_sees_only_the_lr(qwen3):
    lr, sr, gi = _batch()
    other = torch.rand(len(gi), 3, 32, 64)  # another SR, even of another size
    with torch.no_grad():
        a, b = qwen3(lr[gi], sr), qwen3(lr[gi], other)
    assert torch.allclose(a["q_lr"], b["q_lr"], atol=1e-6, rtol=0)
    assert not torch.allclose(a["q_sr"], b["q_sr"], atol=1e-4)  # the SR does matter for Q_SR


@pytest.mark.parametrize("arch", ["qwen3vl", "qwen2.5vl"])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_prefix_reuse_equals_full_sequence(arch, batch_size, qwen3, qwen25):
    model = qwen3 if arch == "qwen3vl" else qwen25
    lr, sr, gi = _batch()
    f, q_lr, q_sr = model.score(lr, sr, gi, batch_size=batch_size)
    ref = model.score_full(lr, sr, gi)
    assert _close((f, q_lr, q_sr), ref)
    for g in range(lr.shape[0]):  # Q_LR: one value per group, exactly (computed once from the prefix)
        assert len(torch.unique(q_lr[gi == g])) == 1
    assert len(torch.unique(q_lr)) == lr.shape[0]


def test_wrong_suffix_positions_are_detected(qwen3, monkeypatch):
    """Negative control: sequential (text-only) positions for the suffix break the equality."""
    lr, sr, gi = _batch()
    ref = qwen3.score_full(lr, sr, gi)

    def naive(ids, grid_lr, grid_sr):
        return torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)

    monkeypatch.setattr(qwen3, "_positions", naive)
    f, _, q_sr = qwen3.score(lr, sr, gi)
    assert max((f - ref[0]).abs().max(), (q_sr - ref[2]).abs().max()) > 1e-3


def test_batched_equals_one_at_a_time(qwen3):
    lr, sr, gi = _batch()
    batched = qwen3.score(lr, sr, gi)
    single = [qwen3.score(lr[g:g + 1], sr[i:i + 1], torch.zeros(1, dtype=torch.long)) for i, g in enumerate(gi)]
    assert _close(batched, [torch.cat(x) for x in zip(*single)])
    with torch.no_grad():
        fwd = qwen3(lr[gi], sr)
        fwd1 = [qwen3(lr[g:g + 1], sr[i:i + 1]) for i, g in enumerate(gi)]
    assert _close([fwd[k] for k in ("f", "q_lr", "q_sr")], [torch.cat([o[k] for o in fwd1]) for k in ("f", "q_lr",
                                                                                                        "q_sr")])


@pytest.mark.parametrize("arch", ["qwen3vl", "qwen2.5vl"])
def test_pixels_match_the_image_processor(arch, qwen3, qwen25):
    model = qwen3 if arch == "qwen3vl" else qwen25
    factor = model.patch * model.merge
    img = torch.rand(2, 3, factor, 2 * factor)  # a valid size in the budget: no resize on either side
    pv, grid = model.pixels(img)
    arr = [a for a in (img * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    ref = model.image_processor(images=arr, do_resize=False, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"].long())
    assert torch.allclose(pv, ref["pixel_values"].float(), atol=1e-6, rtol=0)


def test_fit_size_follows_smart_resize():
    try:  # transformers 5: the PIL module (the default one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w in [(9, 7), (16, 16), (100, 37), (512, 512), (700, 300), (33, 1000), (2000, 1500)]:
        for factor, lo, hi in [(32, 256 * 256, 512 * 512), (28, 56 * 56, 28 * 28 * 1280), (32, 32 * 32, 64 * 64)]:
            assert fit_size(h, w, factor, lo, hi) == tuple(smart_resize(h, w, factor, lo, hi)), (h, w, factor)


@pytest.mark.parametrize("gamma", [7.0, 3.0, 12.0])
def test_reward_range_matches_brute_force(gamma):
    lo, hi = reward_range("full", gamma)
    f = torch.linspace(0, 1, 2001, dtype=torch.float64).view(-1, 1, 1)
    q_lr = torch.linspace(1, 5, 401, dtype=torch.float64).view(1, -1, 1)
    q_sr = torch.linspace(1, 5, 9, dtype=torch.float64).view(1, 1, -1)  # R is linear in Q_SR: its ends suffice
    r = compass_reward_ref(f, q_lr, q_sr, gamma)
    assert hi == 5.0 and float(r.max()) == pytest.approx(5.0)
    assert lo <= float(r.min()) + 1e-12 and float(r.min()) - lo < 2e-3
    if gamma == 7.0:
        assert lo == pytest.approx(-0.450739, abs=1e-6)
    assert reward_range("dq_only") == (-4.0, 4.0) and reward_range("no_fidelity") == (1.0, 5.0)
    with pytest.raises(UserError, match="full, dq_only, no_fidelity"):
        reward_range("bogus")


@pytest.mark.parametrize("variant", ["full", "dq_only", "no_fidelity"])
def test_reward_formula_mapping_and_variants(qwen3, variant):
    lr, sr, gi = _batch()
    reward = CompassReward(qwen3, variant=variant, gamma=7.0, batch_size=4)
    scores, parts = reward(lr[gi], sr, None, gi)  # lr arrives per candidate, as the RL loop gives it
    f, q_lr, q_sr = qwen3.score(lr, sr, gi)
    assert _close((parts["f"], parts["q_lr"], parts["q_sr"]), (f, q_lr, q_sr))
    expect = {"full": compass_reward_ref(f, q_lr, q_sr, 7.0), "dq_only": q_sr - q_lr,
              "no_fidelity": compass_reward_ref(torch.ones_like(f), q_lr, q_sr, 7.0)}[variant]
    lo, hi = reward_range(variant, 7.0)
    assert torch.allclose(parts["r_raw"], expect, atol=1e-6)
    assert torch.allclose(scores, (expect - lo) / (hi - lo), atol=1e-6)
    assert scores.dtype == torch.float32 and scores.shape == (len(gi),)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    if variant == "no_fidelity":
        assert torch.allclose(parts["r_raw"], q_sr, atol=1e-6)
    # the mapping's ends: the extremes of the raw reward map to 0 and 1
    assert torch.allclose(reward.normalise(torch.tensor([lo, hi])), torch.tensor([0.0, 1.0]))


def test_reward_with_unordered_group_ids(qwen3):
    lr, sr, gi = _batch()
    ids = torch.tensor([7, 2, 5])[gi]  # arbitrary group ids, as long as each names one LR
    s1, _ = CompassReward(qwen3)(lr[gi], sr, None, ids)
    s2, _ = CompassReward(qwen3)(lr[gi], sr, None, gi)
    assert torch.allclose(s1, s2, atol=TOL)


def test_save_load_round_trip(qwen3, tmp_path):
    lr, sr, gi = _batch()
    qwen3.save_pretrained(tmp_path / "compass")
    assert (tmp_path / "compass" / HEAD_FILE).is_file() and (tmp_path / "compass" / "config.json").is_file()
    loaded = CompassModel.from_pretrained(tmp_path / "compass")
    assert loaded.config == qwen3.config
    assert type(loaded.backbone) is type(qwen3.backbone)
    assert _close(loaded.score(lr, sr, gi), qwen3.score(lr, sr, gi), tol=1e-6)


def test_missing_checkpoint_errors(qwen3, tmp_path):
    with pytest.raises(MissingFileError, match="huggingface-cli download Qwen/Qwen3-VL-8B-Instruct"):
        CompassModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no config.json"):
        CompassModel.from_pretrained(tmp_path / "empty")
    # a base VL checkpoint (no head): refused for scoring, accepted (zeroed heads) to start training
    base = tmp_path / "base"
    qwen3.save_pretrained(base)
    (base / HEAD_FILE).unlink()
    with pytest.raises(MissingFileError, match="not a trained COMPASS"):
        CompassModel.from_pretrained(base)
    fresh = CompassModel.from_pretrained(base, require_head=False, config=CompassConfig(head_hidden=16,
                                                                                        max_pixels=64 * 64))
    lr, sr, gi = _batch()
    f, q_lr, q_sr = fresh.score(lr, sr, gi)
    assert torch.allclose(f, torch.full_like(f, 0.5)) and torch.allclose(q_lr, torch.full_like(q_lr, 3.0))
    assert torch.allclose(q_sr, torch.full_like(q_sr, 3.0))


def test_bad_inputs(qwen3):
    lr, sr, gi = _batch()
    with pytest.raises(UserError, match="group_index must lie"):
        qwen3.score(lr, sr, gi + 3)
    with pytest.raises(UserError, match="group_index must be"):
        qwen3.score(lr, sr, gi[:-1])
    with pytest.raises(UserError, match=r"\(N, 3, H, W\)"):
        qwen3.pixels(sr[:, :1])
    with pytest.raises(UserError, match="batch_size"):
        CompassReward(qwen3, batch_size=0)


def test_images_resized_into_the_pixel_budget(qwen3):
    c = qwen3.config
    for h, w in [(16, 20), (300, 200)]:
        rh, rw = qwen3.image_size(h, w)
        assert rh % 32 == 0 and rw % 32 == 0 and c.min_pixels <= rh * rw <= c.max_pixels
    _, grid = qwen3.pixels(torch.rand(1, 3, 300, 200))
    assert int(grid[0].prod()) * 16 * 16 <= c.max_pixels
    assert np.isfinite(qwen3.score(torch.rand(1, 3, 9, 7), torch.rand(2, 3, 300, 200), torch.zeros(2,
                                                                                                  dtype=torch.long))[0]
                       .numpy()).all()


def test_benchmark_script_runs(tmp_path):
    """The scoring benchmark end to end on smoke shapes (so a device session is not spent on a typo)."""
    import csv

    from benchmarks import compass_scoring

    res = compass_scoring.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "compass_scoring.csv")))
    assert [r["provider"] for r in rows] == ["prefix_reuse", "full"] and all(float(r["ms"]) > 0 for r in rows)
    assert res["maxdiff_fp32"] <= 1e-4 and res["speedup"] > 0
