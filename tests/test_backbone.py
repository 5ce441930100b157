import pytest
import torch

from oars_fast.config import ModelConfig
from oars_fast.models.backbone import Condition, build_tiny, load_backbone, pack_latents, unpack_latents


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


# ------------------------------------------------------------------------------------------------
# Edit conditioning (Qwen-Image-Edit-2509's): the LR image inside the Qwen2.5-VL prompt
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_edit():
    return build_tiny(ModelConfig(condition="edit"), seed=0).eval()


def test_edit_prompt_is_built_as_the_edit_plus_pipeline_builds_it(tiny_edit):
    """The token sequence: the Edit-Plus template around 'Picture 1: <|vision_start|>' + one <|image_pad|>
    per merged patch + '<|vision_end|>' + instruction (diffusers QwenImageEditPlusPipeline
    ._get_qwen_prompt_embeds; Qwen2VLProcessor's pad expansion); the first 64 hidden states dropped."""
    from oars_fast.models import text_encoder as te

    enc = tiny_edit.prompt_encoder
    lr = torch.rand(2, 3, 16, 24)
    assert te.condition_size(24, 16) == (480, 320)  # 384^2 area at 3:2, sides multiples of 32
    vis = enc.image_processor(images=enc._images(lr), return_tensors="pt")
    n_pad = int(vis["image_grid_thw"][0].prod()) // 4
    text = te.EDIT_TEMPLATE.format("Picture 1: <|vision_start|>" + "<|image_pad|>" * n_pad + "<|vision_end|>"
                                   + tiny_edit.instruction)
    ids = enc.tokenizer(text)["input_ids"]
    embeds, mask = enc(lr, tiny_edit.instruction)
    assert embeds.shape == (2, len(ids) - te.EDIT_DROP_TOKENS, tiny_edit.transformer.config.joint_attention_dim)
    assert mask.shape == embeds.shape[:2] and bool(mask.all())
    # the image is inside the prompt: another LR gives another prompt, the same LR the same one
    other, _ = enc(torch.rand(2, 3, 16, 24), tiny_edit.instruction)
    again, _ = enc(lr, tiny_edit.instruction)
    assert not torch.allclose(embeds, other) and torch.equal(embeds, again)
    single, _ = enc(lr[1:], tiny_edit.instruction)
    assert torch.allclose(single[0], embeds[1], atol=1e-5)  # batched = one at a time


def test_edit_condition_carries_per_input_prompts_through_velocity(tiny_edit):
    lr = torch.rand(3, 3, 8, 8)
    cond = tiny_edit.condition(lr)
    assert cond.latents.shape == (3, 16, 8, 8) and cond.prompt.shape[0] == 3
    rep = cond.repeat_interleave(2)
    assert len(rep) == 6 and torch.equal(rep.prompt[2], cond.prompt[1]) and torch.equal(rep[4:].latents,
                                                                                         cond[2:].repeat_interleave(2).latents)
    x, t = torch.randn(3, 16, 8, 8), torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        v = tiny_edit.velocity(x, t, cond)
        swapped = tiny_edit.velocity(x, t, Condition(cond.latents, cond.prompt.flip(0), cond.prompt_mask))
    assert not torch.allclose(v[0], swapped[0])  # the prompt (with the image) conditions the prediction
    with pytest.raises(ValueError, match="needs a Condition"):
        tiny_edit.velocity(x, t, cond.latents)


def test_edit_model_saves_and_reloads_with_its_encoder(tiny_edit, tmp_path):
    tiny_edit.save_pretrained(tmp_path / "m")
    for sub in ("text_encoder", "tokenizer", "processor"):
        assert (tmp_path / "m" / sub).is_dir()
    loaded = load_backbone(ModelConfig(pretrained=str(tmp_path / "m")), device="cpu").eval()  # auto: edit
    assert loaded.condition_kind == "edit"
    lr, x, t = torch.rand(2, 3, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        a = loaded.velocity(x, t, loaded.condition(lr))
        b = tiny_edit.velocity(x, t, tiny_edit.condition(lr))
    assert torch.allclose(a, b, atol=1e-5)


def test_true_cfg_combines_as_qwen_image_does(tiny_edit):
    """sampler.cfg_scale: comb = neg + s (cond - neg), rescaled per packed token to ||cond|| (diffusers
    QwenImageEditPlusPipeline.__call__); off at 1.0."""
    from oars_fast.config import SamplerConfig
    from oars_fast.models.sampler import guided, sample_sr

    g = torch.Generator().manual_seed(1)
    cond_v, neg_v = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    out = guided(lambda x, s: cond_v, lambda x, s: neg_v, 4.0)(None, None)
    pc, pn = pack_latents(cond_v), pack_latents(neg_v)
    comb = pn + 4.0 * (pc - pn)
    ref = comb * pc.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    assert torch.allclose(pack_latents(out), ref, atol=1e-6)
    lr = torch.rand(1, 3, 8, 8)
    plain = sample_sr(tiny_edit, lr, SamplerConfig(steps=2), seeds=[0])
    again = sample_sr(tiny_edit, lr, SamplerConfig(steps=2, cfg_scale=1.0), seeds=[0])
    cfg = sample_sr(tiny_edit, lr, SamplerConfig(steps=2, cfg_scale=4.0), seeds=[0])
    assert torch.equal(plain, again) and not torch.allclose(plain, cfg)


def test_text_encoder_offload_keeps_the_encoder_in_host_memory(tiny_edit, tmp_path):
    """model.text_encoder_offload: the loaded prompt encoder stays in host memory; inside `prompt_encoder_on` its
    tensors live on the device (here the meta device stands in for a GPU) and afterwards point at the very same
    host storage again (nothing copied back, nothing left on the device); a nested block is a no-op (inference holds
    one per image across its tiles); on the CPU the block does nothing and the condition is the plain model's."""
    tiny_edit.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(pretrained=str(tmp_path / "m"), text_encoder_offload=True)
    model = load_backbone(cfg, device="cpu").eval()
    enc = model.prompt_encoder

    def tensors():
        return [*enc.parameters(), *enc.buffers()]

    assert len(model._offload_slots) >= len(tensors()) > 0
    before = [t.data_ptr() for t in tensors()]
    with model.prompt_encoder_on(torch.device("meta")):
        assert all(t.device.type == "meta" for t in tensors())
        assert all(p.device.type == "cpu" for p in model.transformer.parameters())  # only the encoder moves
        inner = [id(t) for t in tensors()]
        with model.prompt_encoder_on(torch.device("meta")):  # nested: the same device copies, no second transfer
            assert [id(t) for t in tensors()] == inner
        assert all(t.device.type == "meta" for t in tensors())  # still on the device until the outer block ends
    assert all(t.device.type == "cpu" for t in tensors()) and [t.data_ptr() for t in tensors()] == before
    lr = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    plain = load_backbone(ModelConfig(pretrained=str(tmp_path / "m")), device="cpu").eval()
    a, b = model.condition(lr), plain.condition(lr)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt, b.prompt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host <-> GPU offload)")
def test_text_encoder_offload_frees_the_device_between_calls(tiny_edit, tmp_path):
    tiny_edit.save_pretrained(tmp_path / "m")
    on = load_backbone(ModelConfig(pretrained=str(tmp_path / "m"), text_encoder_offload=True), device="cuda").eval()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in on.prompt_encoder.parameters())
    lr = torch.rand(2, 3, 8, 12, device="cuda")
    enc_bytes = sum(t.numel() * t.element_size() for t in (*on.prompt_encoder.parameters(),
                                                              *on.prompt_encoder.buffers()))
    on.condition(lr)  # warm-up: the cuBLAS workspace (~32 MiB, counted by memory_allocated) stays allocated
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    a = on.condition(lr)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base >= enc_bytes  # it was on the device while it ran
    held = sum(t.numel() * t.element_size() for t in (a.latents, a.prompt, a.prompt_mask) if t is not None)
    assert torch.cuda.memory_allocated() - base <= held + enc_bytes // 4  # and its device copy is gone
    assert all(p.device.type == "cpu" for p in on.prompt_encoder.parameters())
    off = load_backbone(ModelConfig(pretrained=str(tmp_path / "m")), device="cuda").eval()
    b = off.condition(lr)
    torch.testing.assert_close(a.prompt, b.prompt)
    torch.testing.assert_close(a.latents, b.latents)
