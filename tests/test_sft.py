"""SFT on the tiny model, CPU, fixed seeds."""
import json
import os
from pathlib import Path

import pytest
import torch

from oars_fast.config import SFTJob, load_config
from oars_fast.data.images import load_image, scan_images
from oars_fast.models.backbone import load_backbone
from oars_fast.models.sampler import sample_sr
from oars_fast.stages.sft import SFTStage

GOLDEN = Path(__file__).parent / "golden" / "sft_tiny.json"


@pytest.fixture
def _cache(demo_cache, monkeypatch):
    monkeypatch.setenv("OARS_TEST_DEMO_CACHE", str(demo_cache))


def _job(tmp_path, name, *overrides):
    return load_config(SFTJob, None, [
        f"run.output_dir={tmp_path}", f"run.name={name}", "run.device=cpu", "run.seed=3",
        f"data.demo_cache={os.environ['OARS_TEST_DEMO_CACHE']}", "data.crop_size=32", "data.batch_size=4",
        "model.tiny={num_layers: 1}", "optim.lr=1e-3", "optim.warmup_steps=2", "sampler.steps=4",
        "sft.sample_every=0", "sft.save_every=0", *overrides])


def _run(job, until=None):
    stage = SFTStage(job).setup()
    try:
        return stage.train(until=until), stage
    finally:
        stage.cleanup()


pytestmark = pytest.mark.usefixtures("_cache")


def test_golden_losses(tmp_path):
    losses, _ = _run(_job(tmp_path, "golden", "sft.steps=4"))
    if os.environ.get("OARS_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=2e-4)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, _ = _run(_job(tmp_path, "full", "sft.steps=6", "sft.save_every=3"))
    _, stopped = _run(_job(tmp_path, "cut", "sft.steps=6", "sft.save_every=3"), until=4)  # dies after step 4
    assert (tmp_path / "cut" / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    resumed, stage = _run(_job(tmp_path, "cut", "sft.steps=6", "sft.save_every=3", "run.resume=true"))
    assert stage.step == 6
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-7)  # steps 4-6 redone from the step-3 checkpoint
    assert (tmp_path / "cut" / "model" / "transformer").is_dir()


def test_training_learns_and_beats_untrained_model(tmp_path, tiny_base):
    job = _job(tmp_path, "learn", f"model.pretrained={tiny_base}", "sft.steps=60", "optim.lr=2e-3",
               "degradation.kind=bicubic", "data.batch_size=4", "sft.timestep_sampling=uniform")
    losses, stage = _run(job)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    # SR of training patches: the trained model beats the untrained one in PSNR against HR
    files = scan_images(Path(stage.dataset.files[0]).parent)[:4]
    hr = torch.stack([load_image(f)[:, :32, :32] for f in files])
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    untrained = load_backbone(job.model, 4, "cpu").eval()
    trained = load_backbone(job.model.__class__(**{**job.model.__dict__, "pretrained": str(stage.run_dir / "model")}),
                            4, "cpu").eval()

    def psnr(m):
        sr = sample_sr(m, lr, job.sampler, seeds=[0, 1, 2, 3], steps=8)
        return float(-10 * torch.log10((sr - hr).pow(2).mean()))

    p_untrained, p_trained = psnr(untrained), psnr(trained)
    print(f"PSNR untrained {p_untrained:.2f} dB, trained {p_trained:.2f} dB")
    assert p_trained > p_untrained + 1.0, (p_untrained, p_trained)


def test_lora_sft_trains_only_the_adapter_and_exports_merged(tmp_path):
    job = _job(tmp_path, "lora", "sft.steps=3", "sft.train=lora", "lora.rank=4", "lora.alpha=8",
               "lora.target_modules=[to_q,to_v]")
    _, stage = _run(job)
    assert all("lora_" in k for k in stage.params) and stage.params
    exported = load_backbone(job.model.__class__(pretrained=str(stage.run_dir / "model")), 4, "cpu").eval()
    x, c, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.2, 0.6])
    stage.model.eval()
    with torch.no_grad():
        assert torch.allclose(exported.velocity(x, t, c), stage.model.velocity(x, t, c), atol=1e-5)


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    stage = SFTStage(_job(tmp_path, "nan", "sft.steps=2")).setup()
    before = {k: p.detach().clone() for k, p in stage.params.items()}
    import oars_fast.stages.sft as sft_mod

    real = sft_mod.flow_matching_loss
    monkeypatch.setattr(sft_mod, "flow_matching_loss", lambda *a: real(*a) * float("nan"))
    stats = stage.train_step()
    stage.cleanup()
    assert stats["nonfinite"] == 1
    assert all(torch.equal(before[k], p) for k, p in stage.params.items())
