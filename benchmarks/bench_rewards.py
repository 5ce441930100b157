"""COMPASS reward (elementwise, with gradient) and group advantages (one launch for all groups) vs
their eager references vs torch.compile; N = K x inputs rewards (K = 24).

    python -m benchmarks.bench_rewards [--smoke] [--out DIR]
"""
from __future__ import annotations

import torch

from oars_fast.kernels import compass_reward, compass_reward_ref, group_advantages, group_advantages_ref

from .harness import Case, bench_main


def compass_case(n: int, device) -> Case:
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        f = (torch.rand(n, generator=g, device=device) * 0.9 + 0.1).requires_grad_()
        ql = (torch.rand(n, generator=g, device=device) * 4 + 1).requires_grad_()
        qs = (torch.rand(n, generator=g, device=device) * 4 + 1).requires_grad_()
        return f, ql, qs

    return Case("compass_reward", {"n": n}, torch.float32, make,
                {"ours": compass_reward, "eager": compass_reward_ref, "compile": torch.compile(compass_reward_ref)},
                bytes={"fwd": 16 * n, "bwd": 28 * n, "full": 44 * n}, grad_of=(0, 1, 2))


def group_case(n_inputs: int, k: int, device) -> Case:
    def make():
        return (torch.rand(n_inputs * k, generator=torch.Generator(device=device).manual_seed(0), device=device),)

    first = lambda fn: (lambda x: fn(x, k)[0])  # noqa: E731
    return Case("group_advantages", {"groups": n_inputs, "k": k}, torch.float32, make,
                {"ours": first(group_advantages), "eager": first(group_advantages_ref),
                 "compile": torch.compile(first(group_advantages_ref))}, modes=("fwd",))


def cases(smoke: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        return [compass_case(100, device), group_case(3, 24, device)]
    return [compass_case(24 * 64, device), compass_case(2**20, device), group_case(64, 24, device),
            group_case(512, 24, device)]


def main(argv=None) -> None:
    bench_main(__doc__, cases, argv)


if __name__ == "__main__":
    main()
