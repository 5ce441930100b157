"""Triton kernels of oars-fast, installed as `oars_fast.kernels`. Imports torch and triton only.

Each op file holds the `@triton.jit` kernels, their launchers, the torch.library op (custom op +
fake + autograd), the public function and a pure-torch `*_ref` with the same signature. Where
Triton cannot run (CPU tensors without TRITON_INTERPRET=1) the public functions use the refs.
"""
# This folder is installed as oars_fast.kernels. From the repo root it is also reachable as a
# top-level `kernels`, and libraries probe for the PyPI package of that name (transformers imports
# it to read its version). Such an import must stay inert: registering our torch.library ops a
# second time replaces the first registration and corrupts the dispatcher. Inert, with no
# __version__, the probe reads "not installed".
if __name__ == "oars_fast.kernels":
    from ._common import backend, get_backend, set_backend, use_triton
    from .fp8_quant import fp8_quantize_rows, fp8_quantize_rows_ref
    from .lora_linear import lora_linear, lora_linear_addmm, lora_linear_ref
    from .nft_loss import nft_loss, nft_loss_ref, nft_loss_with_stats
    from .rewards import compass_reward, compass_reward_ref, group_advantages, group_advantages_ref

    __all__ = [
        "backend", "get_backend", "set_backend", "use_triton", "fp8_quantize_rows", "fp8_quantize_rows_ref",
        "lora_linear", "lora_linear_addmm", "lora_linear_ref",
        "nft_loss", "nft_loss_ref", "nft_loss_with_stats",
        "compass_reward", "compass_reward_ref", "group_advantages", "group_advantages_ref",
    ]
