"""benchmarks.rl_cost: the op counter, the transformer's cost model against PyTorch's FLOP counter on a real
forward + backward, parameter counts from meta-built modules, the update's scaling, the command line."""

import csv
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import rl_cost
from oars_fast.config import LoRAConfig, RLJob, load_config
from oars_fast.models.lora import add_lora

TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)
IMG, TXT = 16, 7  # target tokens (4x4 grid; as many condition tokens) and text tokens


def test_linear_layer_flops_and_bytes():
    with torch.device("meta"):
        lin = nn.Linear(96, 40)
    x = torch.empty(7, 96, device="meta")
    c = rl_cost.count(lin, lambda: lin(x))
    (op,) = c.ops
    assert op.cat == "linear" and op.module == ""
    assert op.flops == 2 * 7 * 96 * 40
    assert op.bytes == 4 * (7 * 96 + 96 * 40 + 40 + 7 * 40)  # x, W, bias read; y written
    view = rl_cost.count(lin, lambda: x.view(7, 2, 48).transpose(0, 1))
    assert view.ops == []  # views are free


def test_attention_counted_as_one_fused_op():
    q = torch.empty(2, 3, 5, 8, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 3, 11, 8, device="meta", dtype=torch.bfloat16)
    c = rl_cost.count(nn.Identity(), lambda: F.scaled_dot_product_attention(q, k, k))
    assert [(op.cat, op.flops) for op in c.ops] == [("attention", 4 * 2 * 3 * 5 * 11 * 8)]
    assert c.ops[0].bytes == 2 * (2 * 3 * 5 * 8 * 2 + 2 * 2 * 3 * 11 * 8)  # Q, O, K, V


def _tiny_cost(kernel="triton"):
    return rl_cost._transformer_cached(
        json.dumps(TINY), IMG, IMG, TXT, "fp32", tuple(LoRAConfig().target_modules), 4, kernel, "test"
    )


def test_transformer_params_and_linear_flops_match_the_module():
    tr = _tiny_cost()
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**TINY)
    assert tr.params == rl_cost.params(model)
    assert tr.lora_params == 3 * 4 * sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if n.startswith("transformer_blocks.0.")
        and n.endswith(("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
    )
    # every linear times the tokens of its stream, from the module tree alone
    expect = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        leaf = name.split(".")[-2] if name.endswith((".0", ".2", ".1")) else name.split(".")[-1]
        if "mod" in name or "time_text_embed" in name or name == "norm_out.linear":
            tokens = 1
        elif name.startswith("txt_in") or leaf.startswith(("add_", "to_add_out")) or ".txt_mlp." in name:
            tokens = TXT
        else:
            tokens = 2 * IMG
        expect += 2 * tokens * m.in_features * m.out_features
    got = tr.fwd(1, lora=False)
    assert got.flops["linear"] == pytest.approx(expect, rel=1e-9)
    seq = 2 * IMG + TXT
    assert got.flops["attention"] == pytest.approx(3 * 4 * seq * seq * 16 * 2, rel=1e-9)
    assert tr.fwd(5, lora=False).flops["linear"] == pytest.approx(5 * expect, rel=1e-9)


def test_forward_backward_matches_pytorch_flop_counter():
    """A real CPU forward + backward of the LoRA'd tiny transformer (peft layers, only the adapters trained) under
    torch's FlopCounterMode against the model's linear and LoRA GEMMs, forward and backward: which frozen linears
    need dx, the adapters' dx/dA/dB, block 0 and the last block's text tail. (PyTorch's counter has no formula
    for the CPU flash-attention op, so attention is compared on meta tensors above, not here.)"""
    tr = _tiny_cost()
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY)
    model.requires_grad_(False)
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    b = 2
    hs = torch.randn(b, 2 * IMG, TINY["in_channels"])
    ehs = torch.randn(b, TXT, TINY["joint_attention_dim"])
    kw = dict(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        encoder_hidden_states_mask=torch.ones(b, TXT),
        timestep=torch.rand(b),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]] * b,
        return_dict=False,
    )
    with FlopCounterMode(display=False) as fc_fwd:
        model(**kw)
    with FlopCounterMode(display=False) as fc:
        model(**kw)[0].pow(2).mean().backward()
    assert model.transformer_blocks[0].attn.to_q.lora_A["default"].weight.grad is not None
    fwd, bwd = tr.fwd(b), tr.bwd(b)
    assert fc_fwd.get_total_flops() == fwd.flops["lora"] + fwd.flops["linear"]
    assert fc.get_total_flops() - fc_fwd.get_total_flops() == bwd.flops["lora"] + bwd.flops["linear"]


def test_recompute_is_one_more_forward_of_the_blocks():
    tr = _tiny_cost()
    blocks = rl_cost.total(p.at(4) for (where, _), p in tr.parts.items() if where == "block") * 3
    assert tr.recompute(4).total_flops == pytest.approx(blocks.total_flops + 3 * tr.lora_fwd(4).total_flops)
    assert tr.recompute(4).total_flops < tr.fwd(4).total_flops


def test_selective_recompute_counts_only_those_sub_modules():
    """model.checkpointing=attention | mlp: each block's joint attention module (with every adapter: all targets are
    attention projections) or its two feed-forwards, recomputed; together less than the whole block."""
    tr = _tiny_cost()
    att, mlp, full = (tr.recompute(4, mode) for mode in ("attention", "mlp", "full"))
    assert tr.recompute(4, "none").total_flops == 0
    assert att.flops["attention"] == pytest.approx(full.flops["attention"])  # SDPA runs inside `attn`
    assert mlp.flops["attention"] == 0 and mlp.flops["lora"] == 0
    assert att.flops["lora"] == pytest.approx(full.flops["lora"])
    # batch 4 x 3 blocks; attn: Q, K, V, out (d x d) of each stream on its tokens; mlp: d -> 4d -> d per stream
    d = TINY["attention_head_dim"] * TINY["num_attention_heads"]
    tokens = 2 * IMG + TXT
    assert att.flops["linear"] == pytest.approx(4 * 3 * 4 * 2 * tokens * d * d, rel=1e-9)
    assert mlp.flops["linear"] == pytest.approx(4 * 3 * 2 * 2 * tokens * 4 * d * d, rel=1e-9)
    assert att.total_flops + mlp.total_flops < full.total_flops


def test_lora_kernels_differ_in_bytes_not_gemm_flops():
    t, p = _tiny_cost("triton").lora_fwd(8), _tiny_cost("peft").lora_fwd(8)
    assert p.bytes["lora"] > t.bytes["lora"] and p.flops["lora"] > t.flops["lora"]


@pytest.fixture(scope="module")
def fr_job():
    return load_config(RLJob, rl_cost.CONFIGS[0], [], world=8)


def test_update_scales_with_update_times(fr_job):
    five = rl_cost.estimate(fr_job)
    two = rl_cost.estimate(load_config(RLJob, rl_cost.CONFIGS[0], ["rl.timestep_fraction=0.34"], world=8))
    assert fr_job.rl.update_times == 5
    passes = [r for r in five.rows if r.sub and "AdamW" not in r.phase]
    assert {r.phase for r in passes} == {
        "update: old fwd",
        "update: ref fwd",
        "update: current fwd",
        "update: backward",
        f"update: recompute ({rl_cost.recompute_mode(fr_job)})",
    }
    for r5, r2 in zip(passes, (r for r in two.rows if r.sub and "AdamW" not in r.phase)):
        assert r5.cost.total_flops == pytest.approx(2.5 * r2.cost.total_flops, rel=1e-9)
    assert five.phase("rollout").total_flops == two.phase("rollout").total_flops
    # the rollout: 6 steps x 24 candidates x one forward of the full 60-block model
    tr = five.tr
    assert tr.layers == 60 and tr.params > 20e9
    assert five.phase("rollout").total_flops == pytest.approx(6 * tr.fwd(24).total_flops)
    d = tr.cfg["attention_head_dim"] * tr.cfg["num_attention_heads"]  # per block and stream: Q, K, V, out, 4x MLP
    assert tr.fwd(1, lora=False).flops["linear"] == pytest.approx(2 * 12 * d * d * five.geo.seq * 60, rel=0.01)


def test_gradient_checkpointing_and_kl_rows(fr_job):
    est = rl_cost.estimate(
        load_config(RLJob, rl_cost.CONFIGS[0], ["model.gradient_checkpointing=false", "rl.kl_weight=0"], world=8)
    )
    phases = [r.phase for r in est.rows]
    assert not any(p.startswith("update: recompute") for p in phases) and "update: ref fwd" not in phases
    half = rl_cost.estimate(fr_job, kept=0.5)
    assert half.phase("update").total_flops < 0.51 * rl_cost.estimate(fr_job).phase("update").total_flops


def test_prompt_token_estimate():
    assert rl_cost.estimate_tokens("<|im_start|>user\nHello, world.<|im_end|>") == 2 + 5


def test_vl_models_built_on_meta():
    for which, billions in (("qwen2.5-vl-7b", 8.29), ("qwen3-vl-8b", 8.77)):
        m = rl_cost.vl_model(which)
        assert m.params / 1e9 == pytest.approx(billions, abs=0.01)  # the published sizes
        layers = m.text["layers"]
        weights = m.patch_linear + m.merge_linear + layers * m.layer_linear + m.lm_head
        embeds = m.text["vocab"] * m.text["hidden"]
        assert weights <= m.linear_params and weights + embeds > 0.995 * m.params  # the FLOP model sees every weight


@pytest.mark.parametrize("reuse", [True, False])
def test_compass_cost_matches_a_counted_score_of_the_tiny_model(reuse):
    """compass_cost's analytic count against the ops CompassModel.score (prefix once per group, suffixes against
    its keys/values, chunks spanning groups) and score_full actually dispatch on the tiny Qwen3-VL COMPASS."""
    from oars_fast.rewards.compass import CompassModel

    m = CompassModel.tiny()
    vl = rl_cost.vl_shapes(m.backbone, "tiny")
    g, k, bs = 2, 3, 4  # the second chunk of candidates spans both groups
    lr, sr = torch.rand(g, 3, 24, 24), torch.rand(g * k, 3, 96, 96)
    gi = torch.arange(g).repeat_interleave(k)
    fn = m.score if reuse else m.score_full
    counted = rl_cost.count(m, lambda: fn(lr, sr, gi, batch_size=bs)).cost()
    grid_lr, grid_sr = m.pixels(lr)[1], m.pixels(sr)[1]
    pre, suf = m._layout(m._image_tokens(grid_lr), m._image_tokens(grid_sr))
    lay = dict(
        lr_grid=tuple(grid_lr[0, 1:].tolist()),
        sr_grid=tuple(grid_sr[0, 1:].tolist()),
        prefix=len(pre),
        suffix=len(suf),
        head=m.config.head_hidden,
    )
    assert lay["lr_grid"] == (2, 2) and lay["sr_grid"] == (4, 4)  # the LR upscaled to the pixel minimum
    est = rl_cost.compass_cost(vl, lay, g, k, bs, el=4, reuse=reuse)
    assert est.flops["linear"] == pytest.approx(counted.flops["linear"], rel=1e-3)  # every GEMM, heads included
    # attention: the analytic count skips the causal upper triangle of the suffix against the cache, the counter
    # charges its masked rectangle
    assert 0.95 < counted.flops["attention"] / est.flops["attention"] < 1.2
    full = rl_cost.compass_cost(vl, lay, g, k, bs, el=4, reuse=False)
    if reuse:  # prefix reuse saves the LR image and the prefix tokens of every candidate but one per group
        saved = rl_cost.vision_cost(vl, 2, 2, g * k - g, 4) + rl_cost.text_cost(vl, g * k - g, len(pre), 0, el=4)
        assert full.flops["linear"] - est.flops["linear"] == pytest.approx(saved.flops["linear"], rel=1e-9)


def test_nr_reward_row_is_compass_with_prefix_reuse():
    job = load_config(RLJob, rl_cost.CONFIGS[1], [], world=8)
    est = rl_cost.estimate(job)
    (row,) = [r for r in est.rows if r.phase.startswith("reward")]
    lay = rl_cost.compass_layout(job, est.geo)
    assert lay["lr_grid"] == (16, 16) and lay["sr_grid"] == (32, 32)  # 128^2 LR -> 256^2; 512^2 SR, patch 16
    assert lay["prefix"] - 64 < 64 and lay["suffix"] - 256 < 32  # image tokens + a few dozen text tokens
    m = rl_cost.compass_vl(job)
    assert (m.text["layers"], m.text["hidden"], m.vision["depth"], m.vision["hidden"]) == (36, 4096, 27, 1152)
    one = rl_cost.compass_cost(m, lay, 1, 1, 24)
    assert row.cost.total_flops == pytest.approx(rl_cost.compass_cost(m, lay, 1, 24, 24).total_flops)
    # per candidate: the 8B language model on the suffix tokens dominates, 2 * params * tokens within a few %
    per = (row.cost.total_flops - one.total_flops) / 23
    assert per == pytest.approx(2 * 36 * m.layer_linear * lay["suffix"] + 2 * 1024 * m.patch_linear, rel=0.1)
    assert row.cost.total_flops < 0.8 * rl_cost.compass_cost(m, lay, 1, 24, 24, reuse=False).total_flops


def test_cli_table_json_and_measured_ceilings(tmp_path, capsys):
    ceil = tmp_path / "ceilings.csv"
    with open(ceil, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "torch", "name", "value", "unit", "note"])
        w.writeheader()
        w.writerow({"device": "NVIDIA H100 80GB HBM3", "name": "copy_gbps", "value": "3000", "unit": "GB/s"})
        w.writerow(
            {
                "device": "NVIDIA H100 80GB HBM3",
                "name": "linear_16384x3072x3072_tflops",
                "value": "700",
                "unit": "TFLOP/s",
            }
        )
    out = rl_cost.main(
        [
            "--config",
            str(rl_cost.CONFIGS[1]),
            "rl.group_size=8",
            "--gpu",
            "h100",
            "--ceilings",
            str(ceil),
            "--json",
            str(tmp_path / "cost.json"),
        ]
    )
    text = capsys.readouterr().out
    assert "reward (COMPASS 8B)" in text and "measured linear_16384x3072x3072_tflops" in text and "total" in text
    assert "prefix reuse" in text
    data = json.loads((tmp_path / "cost.json").read_text())
    assert data[0]["total_flops"] == pytest.approx(out[0].total.total_flops)
    assert all(math.isfinite(r["seconds"]) and r["seconds"] >= 0 for r in data[0]["rows"])
