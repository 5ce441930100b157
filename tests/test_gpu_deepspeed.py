"""On a GPU only (skipped elsewhere): the DeepSpeed engine in one process with NCCL, bf16 and ZeRO-2/3,
against the plain PyTorch path (float32 master weights + bf16 autocast). Run by
benchmarks/gpu_scaleout_check.sh; the CPU tests cover the multi-rank logic with gloo."""
import pytest
import torch
from _launch import launch, losses
from test_distributed import rl_args, sft_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = ["run.device=cuda", "model.dtype=bf16"]


@pytest.mark.parametrize("stage", [2, 3])
def test_sft_deepspeed_bf16_on_one_gpu(tmp_path, demo_cache, stage):
    base = lambda name, *x: sft_args(tmp_path, demo_cache, name, *GPU, "sft.steps=6", "sft.ema_decay=0.5", *x)  # noqa: E731
    launch(1, base("plain"))
    launch(1, base("ds", "deepspeed.enabled=on", f"deepspeed.zero_stage={stage}"))
    one, got = losses(tmp_path / "plain", "sft"), losses(tmp_path / "ds", "sft")
    assert sorted(got) == sorted(one)
    for s in one:  # bf16 weights vs float32 master weights under bf16 autocast: a few bf16 ulps
        assert got[s] == pytest.approx(one[s], rel=3e-2), (s, got[s], one[s])
    assert (tmp_path / "ds" / "model" / "transformer").is_dir()


def test_rl_deepspeed_bf16_on_one_gpu(tmp_path, demo_cache):
    base = lambda name, *x: rl_args(tmp_path, demo_cache, name, *GPU, *x)  # noqa: E731
    launch(1, base("plain"))
    launch(1, base("ds", "deepspeed.enabled=on", "deepspeed.zero_stage=2"))
    one, got = losses(tmp_path / "plain", "rl", "reward"), losses(tmp_path / "ds", "rl", "reward")
    assert sorted(got) == sorted(one) == [1, 2, 3]
    assert got[1] == pytest.approx(one[1], rel=3e-2)  # the first rollout: same weights, same seeds
