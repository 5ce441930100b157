"""Kill-and-resume: SIGKILL during training and during a checkpoint write, then `--resume`.

The kill is injected (``OARS_FAULT=train:N`` / ``save:N``, see oars_fast.runtime.faults) so it lands
at a known place: at the start of step N, or while checkpoint N is being written (every rank's files
and the weights on disk, marker not yet). The resumed run must start from the newest complete
checkpoint and log the same losses as the uninterrupted run for every later step.
"""
import signal

import pytest
from _launch import launch, losses
from test_distributed import rl_args, sft_args

pytest.importorskip("deepspeed")

SAVE_EVERY = "sft.save_every=2"


def _killed(res) -> bool:
    # a plain process reports -SIGKILL; torchrun exits 1 and names the signal of the killed child
    if res.returncode == -signal.SIGKILL:
        return True
    return res.returncode != 0 and "SIGKILL" in res.stderr


def _check_resume(tmp_path, name, full, nproc, args, fault, resumed_from, stage="sft"):
    res = launch(nproc, args, {"OARS_FAULT": fault}, check=False)
    assert _killed(res), f"{fault}: the run was not killed (rc {res.returncode})"
    ckpts = tmp_path / name / "checkpoints"
    complete = sorted(p.name for p in ckpts.iterdir() if (p / "COMPLETE").is_file())
    assert complete[-1] == f"step_{resumed_from:06d}", complete
    if fault.startswith("save"):
        step = int(fault.split(":")[1])
        assert (ckpts / f"step_{step:06d}.tmp").is_dir() and not (ckpts / f"step_{step:06d}").exists()
    launch(nproc, args + ["run.resume=true"])
    got = losses(tmp_path / name, stage)
    later = [s for s in full if s > resumed_from]
    assert later and all(s in got for s in later)
    for s in later:
        assert got[s] == pytest.approx(full[s], rel=1e-5, abs=1e-8), (fault, s, got[s], full[s])
    assert not list(ckpts.glob("*.tmp")), "the interrupted write was not cleaned up"


def test_sft_killed_in_training_and_in_checkpoint_write_resumes(tmp_path, demo_cache):
    args = lambda name: sft_args(tmp_path, demo_cache, name, "sft.steps=6", SAVE_EVERY, "sft.ema_decay=0.5")  # noqa: E731
    launch(1, args("full"))
    full = losses(tmp_path / "full", "sft")
    _check_resume(tmp_path, "a", full, 1, args("a"), "train:4", resumed_from=2)
    _check_resume(tmp_path, "b", full, 1, args("b"), "save:4", resumed_from=2)


@pytest.mark.timeout(900)
def test_sft_zero3_killed_in_checkpoint_write_resumes(tmp_path, demo_cache):
    """2 ranks, ZeRO-3 + per-rank EMA partitions: the DeepSpeed shards and rank files of the complete
    checkpoint are what the resumed run loads (no consolidated weights in it: deepspeed.consolidate_every=0);
    the losses equal the one-process run's."""
    args = lambda name: sft_args(tmp_path, demo_cache, name, "sft.steps=6", SAVE_EVERY, "sft.ema_decay=0.5",  # noqa: E731
                                 "deepspeed.zero_stage=3", "deepspeed.consolidate_every=0")
    launch(1, args("full"))  # one process, no DeepSpeed: consolidated weights in every checkpoint (its resume source)
    full = losses(tmp_path / "full", "sft")
    assert (tmp_path / "full" / "checkpoints" / "step_000006" / "trainable.safetensors").is_file()
    _check_resume(tmp_path, "z3", full, 2, args("z3"), "save:4", resumed_from=2)
    assert not list((tmp_path / "z3" / "checkpoints").glob("step_*/trainable.safetensors"))


@pytest.mark.timeout(900)
def test_rl_zero2_killed_in_training_resumes(tmp_path, demo_cache):
    """2 ranks, ZeRO-2: old-policy adapter, optimizer shards, data position and schedule restored."""
    args = lambda name: rl_args(tmp_path, demo_cache, name, "rl.iterations=5", "rl.save_every=2",  # noqa: E731
                                "optim.warmup_steps=2", "optim.schedule=cosine")
    launch(1, args("full"))
    full = losses(tmp_path / "full", "rl")
    _check_resume(tmp_path, "z2", full, 2, args("z2"), "train:4", resumed_from=2, stage="rl")


def test_pruning_spares_the_newest_checkpoint_with_consolidated_weights(tmp_path):
    """keep=2, consolidated weights in the 1st and 3rd of five checkpoints (deepspeed.consolidate_every=2): the
    newest two stay, and so does the 3rd, the newest that a run on another world size could start from."""
    from oars_fast.runtime.checkpoint import complete_checkpoints, save_checkpoint

    for step in range(1, 6):
        write = (lambda f: (f / "w.safetensors").write_text("w")) if step in (1, 3) else (lambda f: None)
        save_checkpoint(tmp_path, step, write, {"step": step}, keep=2, keep_with="w.safetensors")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4, 5]
    save_checkpoint(tmp_path, 6, lambda f: None, {"step": 6}, keep=2)  # without keep_with: the newest two only
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [5, 6]


def test_publish_folder_replaces_a_result_whole(tmp_path):
    from oars_fast.runtime.checkpoint import publish_folder

    dst, tmp = tmp_path / "model", tmp_path / "model.tmp"
    for version in ("one", "two"):
        tmp.mkdir()
        (tmp / "weights").write_text(version)
        (tmp_path / "model.old").mkdir(exist_ok=True)  # a leftover of an interrupted publish
        assert publish_folder(tmp, dst) == dst
        assert (dst / "weights").read_text() == version
        assert not tmp.exists() and not (tmp_path / "model.old").exists()
