"""The demo base stage's VAE pre-training and the exact single-frame fast path of the VAE it runs on."""

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from oars_fast.models.backbone import TINY_VAE
from oars_fast.models.vae_fast import single_frame_convs


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(**TINY_VAE)


def _no_instance_forward(module):
    return all("forward" not in m.__dict__ for m in module.modules())


def _step(vae, x):
    """Encode (posterior sample and mode), decode, a loss and its gradients: what VAE training runs."""
    vae.zero_grad(set_to_none=True)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mode()).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-3 * kl
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    return post.mean.detach(), post.logvar.detach(), rec.detach(), grads


def test_single_frame_path_matches_outputs_and_gradients(vae):
    x = torch.rand(3, 3, 1, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = _step(vae, x)
    with single_frame_convs(vae) as n:
        assert n == sum(type(m).__name__ == "QwenImageCausalConv3d" for m in vae.modules()) > 0
        assert not _no_instance_forward(vae)
        fast = _step(vae, x)
    assert _no_instance_forward(vae)  # the library's own forward again
    for a, b in zip(ref[:3], fast[:3]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert ref[3].keys() == fast[3].keys() and len(ref[3]) > 100  # (time_conv: multi-frame only)
    for name, g in ref[3].items():
        torch.testing.assert_close(fast[3][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the temporal slices the 2-D path leaves out get no gradient in the original either
    w = dict(vae.named_parameters())["encoder.conv_in.weight"]
    assert w.dim() == 5 and torch.count_nonzero(ref[3]["encoder.conv_in.weight"][:, :, :-1]) == 0


def test_single_frame_path_falls_back_on_video_and_nests(vae):
    x = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
        with single_frame_convs(vae), single_frame_convs(vae.decoder):
            fast = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert _no_instance_forward(vae)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_single_frame_path_restores_on_error(vae):
    with pytest.raises(RuntimeError):
        with single_frame_convs(vae):
            vae.encode(torch.rand(1, 5, 1, 16, 16))  # wrong channel count
    assert _no_instance_forward(vae)


def test_crop_sampler(demo_cache):
    from oars_fast.config import DataConfig
    from oars_fast.data.build import build_dataset
    from oars_fast.stages.demo_base import CropSampler

    ds = build_dataset(DataConfig(source="demo", demo_cache=str(demo_cache), crop_size=16), 0)
    a, b = CropSampler(ds, 16, seed=3), CropSampler(ds, 16, seed=3)
    x = a(5)
    assert x.shape == (5, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, b(5))  # seeded
    assert not torch.equal(a(5), x)  # fresh crops each call


def test_pretrain_vae_sets_latent_stats_and_leaves_the_vae_as_it_was(demo_cache):
    from oars_fast.config import DemoBaseJob, load_config
    from oars_fast.models.backbone import build_tiny
    from oars_fast.stages.demo_base import pretrain_vae

    job = load_config(
        DemoBaseJob,
        None,
        [
            f"data.demo_cache={demo_cache}",
            "vae.steps=4",
            "vae.batch_size=4",
            "vae.crop_size=16",
            "model.tiny={num_layers: 1}",
        ],
    )
    model = build_tiny(job.model, seed=0)
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    losses = pretrain_vae(model, job, torch.device("cpu"))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert _no_instance_forward(model.vae) and not model.vae.training
    assert model.vae.state_dict().keys() == before.keys()
    assert any(not torch.equal(v, before[k]) for k, v in model.vae.state_dict().items())
    assert model.latents_std.shape == (1, 16, 1, 1) and float(model.latents_std.min()) > 0
    assert model.vae.config.latents_mean == model.latents_mean.flatten().tolist()


def test_backbone_encode_decode_take_the_fast_path_and_agree(tiny_base, monkeypatch):
    """SRBackbone.encode / decode run the VAE through single_frame_convs (every SFT latent, rollout decode and
    inference output does) and give what the library's 3-D path gives."""
    from oars_fast.config.components import ModelConfig
    from oars_fast.models import backbone as bb
    from oars_fast.models import vae_fast

    model = bb.load_backbone(ModelConfig(pretrained=str(tiny_base), dtype="fp32"), 4, "cpu", 0).eval()
    img = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = model.encode(img)
        rec = model.decode(z)
        calls, convs = [], []
        real = bb.single_frame_convs
        monkeypatch.setattr(bb, "single_frame_convs", lambda m: calls.append(m) or real(m))
        real_2d = vae_fast.causal_conv3d_single_frame
        monkeypatch.setattr(vae_fast, "causal_conv3d_single_frame", lambda c, x: convs.append(c) or real_2d(c, x))
        model.decode(model.encode(img))
        assert calls == [model.vae, model.vae]
        n_convs = sum(type(m).__name__ == "QwenImageCausalConv3d" for m in model.vae.modules())
        assert len(set(map(id, convs))) == n_convs - 2  # all but the two time_convs (frames only)
        # the library's own path: the same formulas without the context
        x = (img * 2 - 1).unsqueeze(2)
        z_ref = (model.vae.encode(x).latent_dist.mode()[:, :, 0] - model.latents_mean) / model.latents_std
        zz = (z_ref * model.latents_std + model.latents_mean).unsqueeze(2)
        rec_ref = (model.vae.decode(zz).sample[:, :, 0] + 1).mul(0.5).clamp(0, 1)
    assert _no_instance_forward(model.vae)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec, rec_ref, rtol=1e-4, atol=1e-5)
