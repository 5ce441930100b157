import pytest
import torch

from oars_fast.config import ModelConfig
from oars_fast.models.backbone import build_tiny, load_backbone, pack_latents, unpack_latents


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(ModelConfig(), seed=0).eval()


def test_pack_matches_diffusers_layout():
    from diffusers import QwenImageEditPlusPipeline

    z = torch.randn(2, 16, 6, 10)
    ref = QwenImageEditPlusPipeline._pack_latents(z, 2, 16, 6, 10)
    assert torch.equal(pack_latents(z), ref)
    assert torch.equal(unpack_latents(pack_latents(z), 6, 10), z)


def test_velocity_shapes_and_conditioning(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, 6, generator=g)
    c1, c2 = torch.randn(3, 16, 8, 6, generator=g), torch.randn(3, 16, 8, 6, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        v1, v2 = tiny.velocity(x, t, c1), tiny.velocity(x, t, c2)
        v1b = tiny.velocity(x[1:2], t[1:2], c1[1:2])
    assert v1.shape == x.shape
    assert not torch.allclose(v1, v2)  # the LR latents condition the prediction
    assert torch.allclose(v1[1:2], v1b, atol=1e-5)  # batch-independent


def test_encode_decode_shapes(tiny):
    img = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        z = tiny.encode(img)
        assert z.shape == (2, 16, 64 // tiny.vae_factor, 48 // tiny.vae_factor)
        out = tiny.decode(z)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        lr_z = tiny.encode_lr(torch.rand(2, 3, 16, 12))
    assert lr_z.shape == z.shape
    with pytest.raises(ValueError, match="multiple"):
        tiny.latent_shape(60, 64)


def test_save_and_reload_through_production_loader(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "transformer" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "vae" / "config.json").is_file()
    loaded = load_backbone(ModelConfig(pretrained=str(tmp_path / "ckpt")), device="cpu").eval()
    x, c = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.allclose(loaded.velocity(x, t, c), tiny.velocity(x, t, c), atol=1e-6)
        img = torch.rand(1, 3, 32, 32)
        assert torch.allclose(loaded.encode(img), tiny.encode(img), atol=1e-5)
    assert torch.equal(loaded.prompt_embeds, tiny.prompt_embeds)


def test_bf16_load_casts_transformer(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    m = load_backbone(ModelConfig(pretrained=str(tmp_path / "ckpt"), dtype="bf16"), device="cpu")
    assert m.transformer.dtype == torch.bfloat16
    m32 = load_backbone(ModelConfig(pretrained=str(tmp_path / "ckpt"), dtype="bf16"), device="cpu", train_dtype=True)
    assert m32.transformer.dtype == torch.float32  # master weights; compute under autocast


def test_missing_weights_say_where(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="transformer/"):
        load_backbone(ModelConfig(pretrained=str(tmp_path / "empty")))
