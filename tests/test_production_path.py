"""The production path beyond tiny shapes: a random-weight Qwen-Image-Edit-2509-architecture checkpoint at
full width (the real transformer's head dims, RoPE axes and joint-attention width, one layer), the real
VAE architecture (8x) and a Qwen2.5-VL text encoder of the real hidden width (one layer, a small
vocabulary), saved in the hub's folder layout (transformer/, vae/, text_encoder/, tokenizer/,
processor/, no oars-fast metadata), loaded through the production YAMLs with only depth, size and
device overrides: one SFT step and one RL iteration (K = 2, 64x64 HR) on the CPU, edit conditioning."""
from pathlib import Path

import pytest
import torch

from oars_fast.config import RLJob, SFTJob, load_config
from oars_fast.stages.rl import RLStage
from oars_fast.stages.sft import SFTStage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from oars_fast.models.text_encoder import tiny_edit_encoder

    out = tmp_path_factory.mktemp("qwen-image-edit-2509-1layer")
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(num_layers=1)  # every other value: the production config's
    assert (tr.config.attention_head_dim, tr.config.num_attention_heads, tr.config.joint_attention_dim,
            tuple(tr.config.axes_dims_rope)) == (128, 24, 3584, (16, 56, 56))
    tr.save_pretrained(out / "transformer")
    del tr
    vae = AutoencoderKLQwenImage()  # the production VAE architecture: 8x, 16 channels, its latent statistics
    assert len(vae.config.temperal_downsample) == 3
    vae.save_pretrained(out / "vae")
    tiny_edit_encoder(hidden_size=3584).save_pretrained(out)  # text_encoder/, tokenizer/, processor/
    return out


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    from conftest import write_image

    d = tmp_path_factory.mktemp("hr")
    for i in range(3):
        write_image(d / f"{i}.png", 80, 96, seed=i)
    return d


def _overrides(tmp_path, ckpt, hr):
    return [f"model.pretrained={ckpt}", f"data.hr_dir={hr}", "data.crop_size=64", "data.num_workers=0",
            "data.loader=torch", "run.device=cpu", f"run.output_dir={tmp_path}"]


def test_one_sft_step_through_the_production_config(tmp_path, hub_checkpoint, hr_folder):
    job = load_config(SFTJob, ROOT / "configs/qwen_image_edit/sft.yaml",
                      _overrides(tmp_path, hub_checkpoint, hr_folder) + [
                          "data.batch_size=1", "optim.grad_accum=1", "sft.steps=1", "sft.sample_every=0",
                          "sft.save_every=0", "sampler.steps=2", "sft.ema_decay=0"])
    assert job.model.condition == "edit" and job.model.dtype == "bf16" and job.deepspeed.zero_stage == 3
    stage = SFTStage(job).setup()
    try:
        assert stage.model.condition_kind == "edit" and stage.model.vae_factor == 8
        stats = stage.train_step()
    finally:
        stage.cleanup()
    assert torch.isfinite(torch.tensor([stats["loss"], stats["grad_norm"]])).all() and stats["grad_norm"] > 0


def test_one_rl_iteration_through_the_production_config(tmp_path, hub_checkpoint, hr_folder):
    from oars_fast.rewards.dists import _CONVS, CHANNELS

    g = torch.Generator().manual_seed(0)  # DISTS at its real size with random weights (none can be downloaded)
    vgg = {f"features.{i}.{k}": torch.randn(*(s if k == "weight" else s[:1]), generator=g) * 0.05
           for i, cin, cout in _CONVS for k, s in (("weight", (cout, cin, 3, 3)), ("bias", (cout,)))}
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save({"alpha": torch.rand(1, sum(CHANNELS), 1, 1, generator=g),
                "beta": torch.rand(1, sum(CHANNELS), 1, 1, generator=g)}, tmp_path / "dists.pt")
    job = load_config(RLJob, ROOT / "configs/qwen_image_edit/rl_fr.yaml",
                      _overrides(tmp_path, hub_checkpoint, hr_folder) + [
                          "rl.group_size=2", "rl.inputs_per_iter=1", "rl.iterations=1", "rl.eval_inputs=0",
                          "rl.micro_batch=2", "rl.probe_every=0", "rl.save_every=0", "rl.sft_model=null",
                          "rl.filter_mean=2.0", "lora.kernel=addmm",  # not the Triton interpreter at full width
                          f"reward.dists_vgg={tmp_path / 'vgg.pth'}",
                          f"reward.dists_weights={tmp_path / 'dists.pt'}"])
    assert job.model.condition == "edit" and job.lora.rank == 32 and job.reward.name == "dists"
    stage = RLStage(job).setup()
    try:
        stats = stage.train_iteration()
    finally:
        stage.cleanup()
    assert stats["update_times"] == 5 and stats["cond_s"] > 0  # 5 of the 6 rollout sigmas per candidate
    assert torch.isfinite(torch.tensor([stats["loss"], stats["reward"], stats["grad_norm"]])).all()
