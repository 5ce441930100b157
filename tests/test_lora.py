"""LoRA on the tiny transformer: the fused op vs peft's eager forward, keys, save/load, merging."""
import pytest
import torch

from oars_fast.config import LoRAConfig, ModelConfig
from oars_fast.models.backbone import build_tiny
from oars_fast.models.lora import add_lora, lora_state_dict, merged_state_dict, use_fused_lora

CFG = LoRAConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])


def _model(seed=0):
    m = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=seed)
    m.transformer.requires_grad_(False)
    add_lora(m.transformer, CFG)
    with torch.no_grad():  # peft starts B at zero; give it a value so the adapter matters
        for n, p in m.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def _train(m, steps=3):
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, c = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
        t, v = torch.rand(2, generator=g), torch.randn(2, 16, 4, 4, generator=g)
        loss = (m.velocity(x, t, c) - v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_fused_and_peft_training_agree():
    eager = _model()
    fused = _model()
    n = use_fused_lora(fused.transformer)
    assert n == 5  # one layer, five target modules
    assert type(fused.transformer.transformer_blocks[0].attn.to_q).__name__ == "FusedLoraLinear"
    l_eager, l_fused = _train(eager), _train(fused)
    assert l_fused == pytest.approx(l_eager, rel=1e-4)
    for (k1, p1), (k2, p2) in zip(eager.transformer.named_parameters(), fused.transformer.named_parameters()):
        assert k1 == k2
        # 3 Adam steps of lr 1e-2 move each weight by up to 3e-2; both runs agree to under 1% of that
        assert torch.allclose(p1, p2, atol=2e-4), (k1, (p1 - p2).abs().max())


def test_fused_keeps_peft_keys_and_switching():
    m = _model()
    keys = list(m.transformer.state_dict())
    use_fused_lora(m.transformer)
    assert list(m.transformer.state_dict()) == keys
    x, c, t = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), torch.tensor([0.4])
    with torch.no_grad():
        on = m.velocity(x, t, c)
        m.transformer.disable_adapters()
        off = m.velocity(x, t, c)
        m.transformer.enable_adapters()
        again = m.velocity(x, t, c)
    assert not torch.allclose(on, off) and torch.allclose(on, again)
    assert use_fused_lora(m.transformer, enabled=False) == 5


def test_saved_adapter_reloads_in_peft(tmp_path):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    m = _model()
    use_fused_lora(m.transformer)
    save_file(lora_state_dict(m.transformer), str(tmp_path / "adapter_model.safetensors"))
    fresh = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=0)
    fresh.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=CFG.target_modules))
    set_peft_model_state_dict(fresh.transformer, load_file(str(tmp_path / "adapter_model.safetensors")))
    x, c, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.allclose(fresh.velocity(x, t, c), m.velocity(x, t, c), atol=1e-5)


def test_merged_state_dict_equals_adapter_forward():
    m = _model()
    from diffusers import QwenImageTransformer2DModel

    plain = QwenImageTransformer2DModel.from_config(m.transformer.config)
    plain.load_state_dict(merged_state_dict(m.transformer))
    x, c, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        with_lora = m.velocity(x, t, c)
        m.transformer = plain
        merged = m.velocity(x, t, c)
    assert torch.allclose(with_lora, merged, atol=1e-5)


def test_lora_sft_adapter_merges_into_another_model(tmp_path, demo_cache):
    """The OARS merge: a LoRA trained on one model (the base), its delta added into another (the SFT
    model), equals that other model running the adapter through peft."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from oars_fast.cli import main
    from oars_fast.config import SFTJob, load_config
    from oars_fast.models.backbone import load_backbone
    from oars_fast.stages.sft import SFTStage

    job = load_config(SFTJob, None, [f"run.output_dir={tmp_path}", "run.name=l", "run.device=cpu",
                                     f"data.demo_cache={demo_cache}", "data.crop_size=32", "data.batch_size=2",
                                     "model.tiny={num_layers: 1}", "sft.train=lora", "lora.rank=4", "lora.alpha=8",
                                     "lora.target_modules=[to_q,to_v,add_k_proj]", "sft.steps=3", "optim.lr=1e-2",
                                     "sft.save_every=0", "sft.sample_every=0"])
    stage = SFTStage(job).setup()
    stage.train()
    stage.cleanup()
    lora_dir = tmp_path / "l" / "model" / "lora"
    other = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=5)  # stands in for the SFT model
    other.save_pretrained(tmp_path / "sft")
    assert main(["merge", f"merge.model={tmp_path / 'sft'}", f"merge.lora={lora_dir}",
                 f"merge.output={tmp_path / 'merged'}"]) == 0
    merged = load_backbone(ModelConfig(pretrained=str(tmp_path / "merged")), device="cpu").eval()
    with_adapter = load_backbone(ModelConfig(pretrained=str(tmp_path / "sft")), device="cpu").eval()
    with_adapter.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "add_k_proj"]))
    set_peft_model_state_dict(with_adapter.transformer, load_file(str(lora_dir / "adapter_model.safetensors")))
    x, c, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a, b = merged.velocity(x, t, c), with_adapter.velocity(x, t, c)
        with_adapter.transformer.disable_adapters()
        plain = with_adapter.velocity(x, t, c)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter did learn something


def test_fused_layer_follows_autocast():
    m = _model()
    use_fused_lora(m.transformer)
    layer = m.transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as F.linear under autocast
