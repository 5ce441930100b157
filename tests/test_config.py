from pathlib import Path

import pytest
import yaml

from oars_fast.config import (
    AnnotateJob,
    CompassSFTJob,
    ConfigError,
    DataConfig,
    DataJob,
    DegradationConfig,
    DegradationPass,
    DemoBaseJob,
    EvalJob,
    InferJob,
    MergeJob,
    OptimizerConfig,
    PipelineJob,
    ReportJob,
    RLJob,
    SFTJob,
    load_config,
    per_rank,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"data": DataJob, "sft": SFTJob, "infer": InferJob, "base": DemoBaseJob, "rl": RLJob, "merge": MergeJob,
        "annotate": AnnotateJob, "compass": CompassSFTJob, "eval": EvalJob, "report": ReportJob,
        "pipeline": PipelineJob}


def _job_for(path: Path):
    return JOBS[path.stem.split("_")[0]]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_and_validates(path):
    job = load_config(_job_for(path), path)
    assert job is not None


def test_shipped_configs_exist():
    assert len(list((ROOT / "configs" / "demo").glob("*.yaml"))) >= 2
    assert list((ROOT / "configs" / "qwen_image_edit").glob("*.yaml"))


def test_overrides_are_typed_and_dotted(tmp_path):
    job = load_config(SFTJob, ROOT / "configs/demo/sft.yaml",
                      ["optim.lr=1e-4", "data.batch_size=8", "sft.ema_decay=0.5", "data.flip=false",
                       "lora.target_modules=[to_q,to_k]", "model.pretrained=null"])
    assert job.optim.lr == pytest.approx(1e-4) and isinstance(job.optim.lr, float)
    assert job.data.batch_size == 8 and job.data.flip is False
    assert job.lora.target_modules == ["to_q", "to_k"]
    assert job.model.pretrained is None
    save_config(job, tmp_path / "resolved.yaml")
    again = load_config(SFTJob, tmp_path / "resolved.yaml")
    assert again == job


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(SFTJob, None, ["optim.learning_rate=1"])
    assert "optim.learning_rate" in str(e.value) and "'lr'" in str(e.value)


def test_bad_choice_names_field_value_and_valid_values():
    with pytest.raises(ConfigError) as e:
        load_config(SFTJob, None, ["sft.timestep_sampling=beta"])
    msg = str(e.value)
    assert "timestep_sampling" in msg and "'beta'" in msg and "logit_normal" in msg


@pytest.mark.parametrize("kwargs", [
    {"crop_size": 30, "scale": 4}, {"batch_size": 0}, {"source": "hr"}, {"source": "folder"},
    {"loader": "fast"}, {"small_image": "crop"},
])
def test_data_validation(kwargs):
    with pytest.raises(ConfigError):
        DataConfig(**kwargs)


def test_degradation_validation():
    with pytest.raises(ConfigError, match="kernel_prob"):
        DegradationConfig(kernel_prob=[0.5, 0.5])
    with pytest.raises(ConfigError, match="kernel_range"):
        DegradationConfig(kernel_range=[8])
    with pytest.raises(ConfigError, match="jpeg_range"):
        DegradationPass(jpeg_range=[90, 30])
    with pytest.raises(ConfigError, match="kernel_list has 'box'"):
        DegradationConfig(kernel_list=["iso", "box"], kernel_prob=[0.5, 0.5])


def test_type_errors_name_the_field():
    with pytest.raises(ConfigError, match="optim.grad_accum"):
        load_config(SFTJob, None, ["optim.grad_accum=1.5"])
    with pytest.raises(ConfigError, match="OptimizerConfig.lr"):
        OptimizerConfig(lr=-1.0)


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTJob, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SFTJob, bad)


def test_per_rank_batch():
    assert per_rank(64, 8, 2) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        per_rank(10, 4)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(SFTJob, None, ["data.batch_size=6", "optim.grad_accum=4"])


def test_resolved_yaml_is_plain(tmp_path):
    save_config(DataJob(), tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert data["data"]["source"] == "demo" and data["degradation"]["first"]["jpeg_range"] == [30.0, 95.0]


def test_batch_split_is_checked_against_the_launched_world(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="data.batch_size=6 .*world_size\\*grad_accum=4\\*1"):
        load_config(SFTJob, None, ["data.batch_size=6"], world=4)
    with pytest.raises(ConfigError, match="rl.inputs_per_iter=2"):
        load_config(RLJob, None, ["rl.inputs_per_iter=2"], world=4)
    assert load_config(SFTJob, None, ["data.batch_size=8"], world=4).data.batch_size == 8
    # the CLI passes the launcher's world size (WORLD_SIZE)
    from oars_fast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["sft", "--print-config", "data.batch_size=6"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_nested_sections_keep_their_own_defaults():
    """A YAML that sets one key of a section keeps the section's other defaults, even when the job gives
    that section non-class defaults (RL's optimizer, the second degradation pass)."""
    job = load_config(RLJob, None, ["optim.grad_clip=0.5", "degradation.second.jpeg_range=[40, 90]"])
    assert job.optim.lr == pytest.approx(3e-4) and job.optim.weight_decay == 1e-4 and job.optim.grad_clip == 0.5
    second = job.degradation.second
    assert second.jpeg_range == [40.0, 90.0] and second.blur_prob == 0.8 and second.blur_sigma == [0.2, 1.5]
    assert job.degradation.first.blur_sigma == [0.2, 3.0]


@pytest.mark.parametrize("old,new", [("degradation.blur_sigma2", "degradation.second.blur_sigma"),
                                     ("degradation.jpeg_range", "degradation.first.jpeg_range"),
                                     ("degradation.second_blur_prob", "degradation.second.blur_prob")])
def test_old_flat_degradation_keys_name_their_new_place(old, new):
    with pytest.raises(ConfigError, match=f"{old} has moved: use {new}"):
        load_config(SFTJob, None, [f"{old}=[1, 2]"])


def test_choices_come_from_the_annotations_and_are_checked_however_built():
    with pytest.raises(ConfigError, match=r"DataConfig.loader='fast' is not valid; choose one of \['torch', 'dali'\]"):
        DataConfig(loader="fast")
    with pytest.raises(ConfigError, match="zero_stage=5"):
        load_config(SFTJob, None, ["deepspeed.zero_stage=5"])
    assert load_config(SFTJob, None, ["deepspeed.zero_stage=3", "sft.train=full"]).deepspeed.zero_stage == 3


def test_shipped_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    from oars_fast.config import resolve_config_path, shipped_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/demo/sft.yaml") == shipped_config("demo/sft.yaml")
    assert load_config(SFTJob, "demo/sft.yaml").sft.steps > 0
