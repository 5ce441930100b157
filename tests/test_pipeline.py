"""The whole pipeline end to end on a shrunken demo config (CPU): every stage's outputs, a report whose files
all exist and whose table has a row per model; a second run skips every stage; a run killed mid-stage
resumes that stage."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from oars_fast.config.pipeline import STAGES
from oars_fast.stages.pipeline import DONE

pytestmark = pytest.mark.timeout(1200)

SHRINK = ["pipeline.method_groups=6", "pipeline.heldout=3", "vae.steps=15", "sft.steps=6", "sft.save_every=3",
          "sft.latent_pool=16", "sft.sample_every=0", "sampler.steps=3", "compass.steps=4", "compass.eval_every=0",
          "rl.iterations=2", "rl.eval_inputs=2", "rl.group_size=4", "rl.probe_every=0", "run.log_interval=0"]


def _run(tmp_path, demo_cache, *extra, env=None, check=True):
    args = [sys.executable, "-m", "oars_fast.cli", "pipeline", "--config", "configs/demo/pipeline.yaml",
            f"run.output_dir={tmp_path}", f"data.demo_cache={demo_cache}", *SHRINK, *extra]
    # the stages' LoRA layers on the CPU use the torch reference, as `make demo` does (the kernels have their own
    # tests; under the suite's TRITON_INTERPRET=1 an RL iteration of the demo model takes minutes)
    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=1100, cwd=tmp_path,
                         env={**base_env, "OMP_NUM_THREADS": "2", **(env or {})})
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_pipeline_end_to_end_then_skips_then_resumes(tmp_path, demo_cache):
    res = _run(tmp_path, demo_cache)
    root = tmp_path / "demo"
    for stage in STAGES:
        assert (root / stage / DONE).is_file(), stage
    for path in ("base/model/transformer", "sft/model/transformer", "methods/sr/bicubic", "annotate/manifest.jsonl",
                 "compass/model/compass_head.safetensors", "rl_fr/lora/adapter_model.safetensors",
                 "rl_nr/merged/transformer", "eval/metrics.json", "report.html", "report.png"):
        assert (root / path).exists(), path
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    html = (root / "report.html").read_text()
    assert list(metrics["models"]) == ["bicubic", "SFT", "FR-RL", "OARS", "SFT+BP", "OARS+BP", "HR"]
    for model in metrics["models"]:
        assert f">{model}<" in html, model
    for ref in re.findall(r'(?:src|href)="([^"#:]+)"', html):
        assert (root / ref).exists(), ref  # every file the report references
    assert re.search(r"data\s+ran", res.stdout) and "report" in res.stdout
    # a second run: every stage complete, nothing runs
    again = _run(tmp_path, demo_cache)
    assert len(re.findall(r"done before", again.stdout)) == len(STAGES), again.stdout
    # killed in the middle of a stage (SFT step 4 of 6, after its step-3 checkpoint): the next run resumes it
    (root / "sft" / DONE).unlink()
    for later in STAGES[STAGES.index("sft") + 1:]:
        (root / later / DONE).unlink()
    killed = _run(tmp_path, demo_cache, "pipeline.redo=[sft]", env={"OARS_FAULT": "train:4"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _run(tmp_path, demo_cache, "pipeline.stages=[data, base, sft]")
    assert "sft (resuming)" in resumed.stderr and "resumed from" in resumed.stderr
    assert (root / "sft" / DONE).is_file()


def test_production_pipeline_prints_one_launch_per_stage(tmp_path):
    """Production: every stage is its own launch (training stages under deepspeed), each stage's job loads from the
    shipped production YAMLs with the pipeline's wiring, and the demo-only stages are refused."""
    from oars_fast.config import load_config
    from oars_fast.config.pipeline import PipelineJob
    from oars_fast.config.schema import ConfigError
    from oars_fast.stages.pipeline import STAGES as RUNNERS
    from oars_fast.stages.pipeline import Pipeline

    own = [f"run.output_dir={tmp_path}"]
    job = load_config(PipelineJob, "configs/qwen_image_edit/pipeline.yaml", own)
    pipe = Pipeline(job, ["sampler.steps=20"], own)
    lines = pipe.commands("configs/qwen_image_edit/pipeline.yaml")
    assert [re.search(r"stages=\[(\w+)\]", line).group(1) for line in lines] == job.pipeline.stages
    for line in lines:
        training = any(f"[{s}]" in line for s in ("sft", "compass", "rl_fr", "rl_nr"))
        assert line.startswith("deepspeed --num_gpus 8 --module oars_fast.cli pipeline" if training else "python -m")
        assert line.count(f"run.output_dir={tmp_path}") == 1 and "sampler.steps=20" in line
    for name in job.pipeline.stages:  # the wiring hands the base and the previous stages' folders over
        stage_job = pipe.stage_job(RUNNERS[name], resume=False)
        assert stage_job.run.run_dir == (tmp_path / "oars" / name if name not in ("eval", "report")
                                         else tmp_path / "oars")
        if name in ("sft", "rl_fr", "rl_nr"):
            assert stage_job.model.pretrained == "Qwen/Qwen-Image-Edit-2509"
    (tmp_path / "oars" / "sft").mkdir(parents=True)
    (tmp_path / "oars" / "sft" / DONE).write_text("{}")
    assert len(pipe.commands("x.yaml")) == len(lines) - 1  # a finished stage is not launched again
    with pytest.raises(ConfigError, match="only the demo"):
        load_config(PipelineJob, "configs/qwen_image_edit/pipeline.yaml", ["pipeline.stages=[base, sft]"])


def test_unfaithful_edits_are_sharp_copies_that_are_not_the_input():
    """The annotation set's fidelity negatives: the ground truth moved, recoloured or brightened, nothing blurred."""
    import torch

    from oars_fast.errors import UserError
    from oars_fast.stages.pipeline import unfaithful_edit

    hr = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    moved = unfaithful_edit(hr, "shift3")
    assert moved.shape == hr.shape and torch.equal(moved[..., 3:, 3:], hr[..., :-3, :-3])
    assert torch.equal(moved[..., :3, 3:], hr[..., 1:4, :-3].flip(-2))  # reflected in at the top edge: no seam
    gain = unfaithful_edit(hr, "color0.2") / hr.clamp_min(1e-6)
    assert torch.allclose(gain[:, 1], torch.ones(2, 20, 17))
    assert torch.allclose(gain[:, 0][hr[:, 0] < 0.8], torch.tensor(1.2))  # (red above 1/1.2 saturates)
    assert torch.allclose(gain[:, 2], torch.tensor(0.8))
    bright = unfaithful_edit(hr, "bright0.1")
    assert torch.allclose(bright, (hr + 0.1).clamp(0, 1)) and bright.max() <= 1
    for bad in ("shiftx", "shift0", "shift17", "sharpen2"):
        with pytest.raises(UserError, match="pipeline.methods"):
            unfaithful_edit(hr, bad)
