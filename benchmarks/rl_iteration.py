"""One full RL iteration (rollout K x inputs, reward, NFT update, old-policy EMA) at full transformer
width with fewer layers, bf16: ours (fused LoRA linear + fused NFT loss) against the plain reference
loop (peft's eager LoRA + the pure-torch NFT loss), side by side in one run, time per phase and peak
memory. Both do three transformer forwards per update micro-batch (v_old, v_ref, v_theta). ``--fp8`` adds
"ours_fp8": ours with ``rl.fp8_nograd=rollout_ref`` (fp8 row-wise GEMMs for the frozen block weights in the
rollout and v_ref forwards; sm_89+ or the CPU).

Agreement before the timings count: both start from the same seed, so the warm-up iteration's rollouts
(the LoRA's B is zero at the start: the base model through each provider's linear) and its loss (the fused
vs the pure-torch NFT loss) must agree: reward within 2% (+1e-3), loss within 5% (+1e-4) in bf16. A
mismatch is printed, written into the CSV's note and makes the script exit 1; its timings are not results.
Each of ours / ours_fp8 is compared with the reference.

The model is the production transformer architecture (3072 hidden, 24 heads of 128, text dim 3584,
``--layers`` blocks) with random weights; the VAE is the tiny 4x one, so ``--crop 256`` gives the
token count of a 512x512 production output (1024 target + 1024 LR tokens). The reward is DISTS with
random VGG16 / alpha-beta weights: the compute of the real metric, not its values.

    python -m benchmarks.rl_iteration [--layers 4] [--crop 256] [--k 24] [--inputs 4] [--smoke] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from oars_fast import kernels
from oars_fast.config import ConfigError, RLJob, load_config
from oars_fast.stages.rl import RLStage

from .harness import RESULTS, device_name, git_sha, write_rows


def _dists_weights(path: Path) -> tuple[Path, Path]:
    from oars_fast.rewards.dists import _CONVS, CHANNELS

    g = torch.Generator().manual_seed(0)
    vgg = {}
    for idx, cin, cout in _CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(cout)
    n = sum(CHANNELS)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, path / "vgg16_random.pth")
    torch.save({"alpha": torch.full((1, n, 1, 1), 0.1), "beta": torch.full((1, n, 1, 1), 0.1)},
               path / "dists_random.pt")
    return path / "vgg16_random.pth", path / "dists_random.pt"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model and shapes on any device (a check, not a result)")
    ap.add_argument("--fp8", action="store_true", help="also ours with rl.fp8_nograd=rollout_ref (ours_fp8)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_rl"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    vgg, ab = _dists_weights(args.work / "weights")
    width = (f"{{num_layers: {args.layers}, attention_head_dim: 128, num_attention_heads: 24, "
             "joint_attention_dim: 3584, axes_dims_rope: [16, 56, 56]}")
    common = [f"run.output_dir={args.work}", f"run.device={'cuda' if cuda else 'cpu'}", "rl.probe_every=0",
              "rl.save_every=0", "rl.eval_inputs=0", "reward.name=dists", f"reward.dists_vgg={vgg}",
              f"reward.dists_weights={ab}", "rl.timesteps_per_sample=1", "optim.lr=1e-4", "lora.rank=32",
              "lora.alpha=64"]
    if args.smoke:
        common += ["model.tiny={num_layers: 1}", "data.crop_size=32", "rl.group_size=4", "rl.inputs_per_iter=2",
                   "rl.rollout_steps=2", "model.dtype=fp32", "rl.micro_batch=8", "data.demo_patch=128"]
    else:
        common += [f"model.tiny={width}", f"data.crop_size={args.crop}", f"data.demo_patch={max(128, args.crop)}",
                   f"rl.group_size={args.k}", f"rl.inputs_per_iter={args.inputs}", "model.dtype=bf16",
                   "rl.micro_batch=8", "model.gradient_checkpointing=true"]
    rows, warm, failed = [], {}, []
    providers = [("ours", True, "none")] + ([("ours_fp8", True, "rollout_ref")] if args.fp8 else []) + \
        [("reference", False, "none")]
    for provider, fused, fp8 in providers:
        job = load_config(RLJob, None, common + [f"run.name={provider}", f"lora.kernel={'triton' if fused else 'peft'}",
                                                 f"rl.iterations={args.iters + 1}", f"rl.fp8_nograd={fp8}"])
        try:
            stats = _run_provider(job, fused, args.iters, cuda, warm, provider)
        except (ConfigError, RuntimeError) as e:  # one provider's failure (e.g. fp8 here) is a row, not the end
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"rl_iteration {provider}: failed: {why}")
            failed.append(provider)
            rows.append({"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__,
                         "kernel": "rl_iteration", "provider": provider, "mode": "iteration", "note": f"failed: {why}"})
            continue
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        med = {k: sorted(x[k] for x in stats)[len(stats) // 2] for k in ("iter_s", "rollout_s", "reward_s", "train_s")}
        print(f"rl_iteration {provider:9s} iter {med['iter_s'] * 1e3:9.1f} ms  rollout {med['rollout_s'] * 1e3:9.1f} "
              f"reward {med['reward_s'] * 1e3:8.1f}  update {med['train_s'] * 1e3:9.1f} ms  peak {peak:.0f} MB")
        rows.append({"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__,
                     "kernel": "rl_iteration", "shape": f'{{"layers": {args.layers}, "crop": {args.crop}, '
                     f'"k": {args.k}, "inputs": {args.inputs}}}', "dtype": job.model.dtype, "provider": provider,
                     "mode": "iteration", "ms": f"{med['iter_s'] * 1e3:.1f}",
                     "note": "smoke" if args.smoke else f"rollout {med['rollout_s'] * 1e3:.1f} ms; reward "
                     f"{med['reward_s'] * 1e3:.1f} ms; update {med['train_s'] * 1e3:.1f} ms",
                     "peak_mb": f"{peak:.0f}"})
    ok, notes = not failed, {}
    for provider in warm:
        if provider != "reference" and "reference" in warm:
            good, agreement = check_agreement(warm[provider], warm["reference"])
            ok &= good
            notes[provider] = f"{'agree' if good else 'MISMATCH'}: {agreement}"
            print(f"rl_iteration agreement (warm-up iteration, {provider} vs reference): {agreement}")
    for r in rows:
        if r["provider"] not in failed:
            r["note"] = f"{r['note']}; {notes.get(r['provider'], 'the reference')}"
    write_rows(rows, args.out / "rl_iteration.csv")
    if failed:
        raise SystemExit(f"rl_iteration: {', '.join(failed)} failed (see above)")
    if not ok:
        raise SystemExit("rl_iteration: ours and the reference loop disagree (see above); the timings are not results")


def _run_provider(job: RLJob, fused: bool, iters: int, cuda: bool, warm: dict, provider: str) -> list[dict]:
    """Set up one provider's RL stage, one warm-up iteration (its stats into `warm`: the agreement check), then
    `iters` timed ones -> their stats."""
    with kernels.backend("auto" if fused else "torch"):
        st = RLStage(job).setup()
        try:
            warm[provider] = st.train_iteration()  # warm-up (autotuning, allocator, cuDNN); checked in main
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            stats = []
            for _ in range(iters):
                t0 = time.perf_counter()
                s = st.train_iteration()
                if cuda:
                    torch.cuda.synchronize()
                s["iter_s"] = time.perf_counter() - t0
                stats.append(s)
        finally:
            st.cleanup()
    return stats


def check_agreement(ours: dict, ref: dict, tol: dict | None = None) -> tuple[bool, str]:
    """Compare the warm-up iteration's mean reward and loss of the two providers -> (ok, description)."""
    tol = tol or {"reward": (0.02, 1e-3), "loss": (0.05, 1e-4)}
    ok, parts = True, []
    for key, (rel, abs_) in tol.items():
        a, b = float(ours[key]), float(ref[key])
        good = abs(a - b) <= rel * abs(b) + abs_
        ok &= good
        parts.append(f"{key} {a:.5g} vs {b:.5g}{'' if good else ' (outside tolerance)'}")
    return ok, ", ".join(parts)


if __name__ == "__main__":
    main()
