"""A faster, inference-only copy of a `ResNetV2Keras`.

A pre-activation block runs BN-ReLU before each conv, so only two of its three BatchNorms directly
follow a conv (`norm2` after `conv1`, `norm3` after `conv2`); those are folded into the conv's weight
and bias, leaving the ReLU. `norm1` (after the residual add) and the final `norm` stay as they are.
The result computes the same function up to float32 round-off, but holds no BatchNorm statistics to
update, so it is frozen in eval mode and cannot be trained.
"""
import copy
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ResNetV2ZooError
from .resnetv2_keras import PreActBottleneckKeras, ResNetV2Keras

__all__ = ['FrozenCompiled', 'fold_batchnorms', 'optimize_for_inference']


def fold_batchnorms(model: ResNetV2Keras) -> ResNetV2Keras:
    """Fold each block's `norm2`/`norm3` into `conv1`/`conv2` in place; the norms become their ReLU.

    The model must be in eval mode: folding bakes in the running statistics.
    """
    if model.training:
        raise ResNetV2ZooError('fold_batchnorms needs a model in eval mode (it bakes in the BatchNorm running stats).')
    for block in model.modules():
        if isinstance(block, PreActBottleneckKeras):
            for conv_name, norm_name in (('conv1', 'norm2'), ('conv2', 'norm3')):
                norm = getattr(block, norm_name)
                setattr(block, conv_name, fuse_conv_bn_eval(getattr(block, conv_name), norm))
                setattr(block, norm_name, norm.act)
    return model


def optimize_for_inference(
        model: ResNetV2Keras,
        channels_last: bool = True,
        compile: bool = False,
        compile_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorms folded, gradients off, and optionally compiled.

    Args:
        model: the model to copy; it is left untouched.
        channels_last: store the weights NHWC, the layout oneDNN (CPU) and cuDNN convolutions run fastest
            in; feed it `x.contiguous(memory_format=torch.channels_last)` for the full benefit.
        compile: `torch.compile` the result with Inductor `freezing` (see `FrozenCompiled`); it compiles
            at the first call, which must run under `torch.no_grad()` for freezing to apply.
        compile_kwargs: extra keyword arguments for `torch.compile` (for example `mode='max-autotune'`).
    """
    if not isinstance(model, ResNetV2Keras):
        raise ResNetV2ZooError(f'optimize_for_inference needs a ResNetV2Keras, got {type(model).__name__}.')
    optimized = fold_batchnorms(copy.deepcopy(model).eval())
    optimized.requires_grad_(False)
    if channels_last:
        optimized = optimized.to(memory_format=torch.channels_last)
    if compile:
        optimized = FrozenCompiled(torch.compile(optimized, **(compile_kwargs or {})))
    return optimized


class FrozenCompiled(nn.Module):
    """Calls a `torch.compile`d module with Inductor `freezing` on, without switching it on process-wide.

    Freezing treats the weights as constants: on CPU each conv weight is packed into oneDNN's blocked
    layout once, instead of on every call (about 40% of an eager CPU forward pass), and conv + ReLU /
    conv + add are fused. Inductor reads the setting when it compiles, at the first call, and not from
    `torch.compile(options=...)`, hence the patch around each call.
    """

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)
