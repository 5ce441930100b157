"""An exact fast path for the Qwen-Image VAE's causal 3-D convolutions on single images.

diffusers' ``AutoencoderKLQwenImage`` is a video VAE: every ``QwenImageCausalConv3d`` pads ``kt - 1`` zero
frames in front of its input (causal in time) and runs a 3-D convolution. This project only ever feeds it
images, ``(B, C, 1, H, W)``, and ``encode`` / ``decode`` call each convolution on the first frame without a
cached previous frame. The output then sees only the kernel's last temporal slice, so it *is* a 2-D
convolution with ``weight[:, :, -1]``: the same values (up to float summation order), the same gradients
(the other temporal slices get exactly zero in both), for ``1 / kt`` of the work (a third for the VAE's
3x3x3 kernels; on the CPU a VAE training step runs ~1.7x faster, an encode or decode 2-3x).

:func:`single_frame_convs` switches it on for the convolutions of one module (a VAE, or a model holding
one) for the duration of a ``with`` block; every other input (several frames, a cached frame, a temporal
stride) takes the library's own forward. The library class is not touched: the fast forward is an
attribute of each instance while the block runs and is removed afterwards, so weights, state-dict keys
and ``save_pretrained`` are unchanged.

:meth:`oars_fast.models.backbone.SRBackbone.encode` and ``decode`` run inside it, so every image encode and
decode takes it (SFT latents, LR conditions, rollout and inference decoding), the production 16-channel VAE
included; the demo base's VAE training uses it directly.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["causal_conv3d_single_frame", "single_frame_convs"]


def _causal_conv_class() -> type[nn.Conv3d]:
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    return QwenImageCausalConv3d


def _exact(conv: nn.Conv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> bool:
    """Whether the 2-D path computes exactly what the 3-D one does for this call."""
    pw, pw2, ph, ph2, front, back = conv._padding
    kt = conv.kernel_size[0]
    return (
        x.dim() == 5
        and x.shape[2] == 1
        and cache_x is None
        and conv.stride[0] == 1
        and conv.dilation[0] == 1
        and front == kt - 1
        and back == 0
        and pw == pw2
        and ph == ph2
        and conv.padding_mode == "zeros"
    )


def causal_conv3d_single_frame(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` of a ``QwenImageCausalConv3d`` on a one-frame input (B, C, 1, H, W), as a 2-D convolution."""
    pw, _, ph, _, _, _ = conv._padding
    y = F.conv2d(
        x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], (ph, pw), conv.dilation[1:], conv.groups
    )
    return y.unsqueeze(2)


def _fast_forward(self: nn.Conv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    if _exact(self, x, cache_x):
        return causal_conv3d_single_frame(self, x)
    return type(self).forward(self, x, cache_x)


@contextlib.contextmanager
def single_frame_convs(module: nn.Module) -> Iterator[int]:
    """Within the block, the causal 3-D convolutions inside `module` take the exact 2-D path on one-frame
    inputs; yields how many convolutions were switched. Nested blocks on the same module are fine."""
    cls = _causal_conv_class()
    switched = []
    for m in module.modules():
        if isinstance(m, cls):
            switched.append((m, m.__dict__.get("forward")))
            m.forward = types.MethodType(_fast_forward, m)
    try:
        yield len(switched)
    finally:
        for m, before in reversed(switched):
            if before is None:
                del m.forward
            else:
                m.forward = before
