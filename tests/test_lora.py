"""LoRA on the tiny transformer: our kernels vs peft's eager forward, keys, save/load, exports that load
in peft and diffusers, merging. The models run on the GPU when there is one (the Triton kernel itself),
else on the CPU (the kernel under Triton's interpreter)."""
import pytest
import torch

from oars_fast.config import LoRAConfig, ModelConfig
from oars_fast.models.backbone import build_tiny
from oars_fast.models.lora import add_lora, lora_state_dict, merged_state_dict, save_lora, use_lora_kernel

CFG = LoRAConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(seed=0):
    m = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=seed).to(DEV)
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
        x, c = torch.randn(2, 16, 4, 4, generator=g).to(DEV), torch.randn(2, 16, 4, 4, generator=g).to(DEV)
        t, v = torch.rand(2, generator=g).to(DEV), torch.randn(2, 16, 4, 4, generator=g).to(DEV)
        loss = (m.velocity(x, t, c) - v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kernel", ["triton", "addmm"])
def test_kernel_and_peft_training_agree(kernel):
    eager = _model()
    fused = _model()
    n = use_lora_kernel(fused.transformer, kernel)
    assert n == 5  # one layer, five target modules
    assert type(fused.transformer.transformer_blocks[0].attn.to_q).__name__ == f"{kernel.capitalize()}LoraLinear"
    l_eager, l_fused = _train(eager), _train(fused)
    assert l_fused == pytest.approx(l_eager, rel=1e-4)
    for (k1, p1), (k2, p2) in zip(eager.transformer.named_parameters(), fused.transformer.named_parameters()):
        assert k1 == k2
        # 3 Adam steps of lr 1e-2 move each weight by up to 3e-2; both runs agree to under 1% of that
        assert torch.allclose(p1, p2, atol=2e-4), (k1, (p1 - p2).abs().max())


def test_fused_keeps_peft_keys_and_switching():
    m = _model()
    keys = list(m.transformer.state_dict())
    use_lora_kernel(m.transformer, "triton")
    assert list(m.transformer.state_dict()) == keys
    x, c = torch.randn(1, 16, 4, 4, device=DEV), torch.randn(1, 16, 4, 4, device=DEV)
    t = torch.tensor([0.4], device=DEV)
    with torch.no_grad():
        on = m.velocity(x, t, c)
        m.transformer.disable_adapters()
        off = m.velocity(x, t, c)
        m.transformer.enable_adapters()
        again = m.velocity(x, t, c)
    assert not torch.allclose(on, off) and torch.allclose(on, again)
    assert use_lora_kernel(m.transformer, "peft") == 5


def test_saved_adapter_reloads_in_peft(tmp_path):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    m = _model()
    use_lora_kernel(m.transformer, "triton")
    save_file(lora_state_dict(m.transformer), str(tmp_path / "adapter_model.safetensors"))
    fresh = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=0).to(DEV)
    fresh.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=CFG.target_modules))
    set_peft_model_state_dict(fresh.transformer, load_file(str(tmp_path / "adapter_model.safetensors")))
    x, c, t = torch.randn(2, 16, 4, 4, device=DEV), torch.randn(2, 16, 4, 4, device=DEV), \
        torch.tensor([0.3, 0.8], device=DEV)
    with torch.no_grad():
        assert torch.allclose(fresh.velocity(x, t, c), m.velocity(x, t, c), atol=1e-5)


def test_merged_state_dict_equals_adapter_forward():
    m = _model()
    from diffusers import QwenImageTransformer2DModel

    plain = QwenImageTransformer2DModel.from_config(m.transformer.config).to(DEV)
    plain.load_state_dict(merged_state_dict(m.transformer))
    x, c, t = torch.randn(2, 16, 4, 4, device=DEV), torch.randn(2, 16, 4, 4, device=DEV), \
        torch.tensor([0.3, 0.8], device=DEV)
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


def test_kernel_layer_follows_autocast():
    m = _model()
    use_lora_kernel(m.transformer, "triton")
    layer = m.transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features, device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as F.linear under autocast


def test_exported_adapter_loads_in_peft_and_diffusers_and_equals_our_merge(tmp_path):
    """`save_lora` output through the standard clients: peft's PeftModel.from_pretrained and diffusers'
    load_lora_adapter, each fused into the weights, equal `oars-fast merge` of the same folder."""
    from diffusers import QwenImageTransformer2DModel
    from peft import PeftModel

    from oars_fast.models.lora import lora_deltas

    m = _model()
    save_lora(m.transformer, tmp_path / "lora")
    base = build_tiny(ModelConfig(tiny={"num_layers": 1}), seed=0).transformer  # the weights the LoRA sits on
    ours = {k: v.clone() for k, v in base.state_dict().items()}
    for k, d in lora_deltas(tmp_path / "lora").items():
        ours[k] = ours[k] + d

    def fresh():
        t = QwenImageTransformer2DModel.from_config(base.config)
        t.load_state_dict(base.state_dict())
        return t

    peft_model = PeftModel.from_pretrained(fresh(), str(tmp_path / "lora")).merge_and_unload()
    via_diffusers = fresh()
    via_diffusers.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors",
                                    adapter_name="oars")
    via_diffusers.fuse_lora(lora_scale=1.0)
    via_diffusers.unload_lora()
    adapted = [k for k in ours if not torch.equal(ours[k], base.state_dict()[k])]
    assert len(adapted) == 5  # the five target modules of the one block
    for name, got in (("peft", peft_model.state_dict()), ("diffusers", via_diffusers.state_dict())):
        assert set(got) == set(ours), name
        for k in ours:
            torch.testing.assert_close(got[k], ours[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
