"""ResNet50 / ResNet101 / ResNet152 (v1) exactly as `keras.applications.resnet` builds them.

timm's own `resnet50` is the same paper, but Keras's v1 differs in details its weights depend on:

* the stride of each stage sits on its first block, in the first 1x1 conv (`{name}_1_conv`, as in the
  original Caffe release) and in the 1x1 projection shortcut; the 3x3 conv has stride 1 (timm: on the 3x3);
* every conv has a bias, even those a BatchNorm follows (`use_bias=True` for the whole network);
* the stem is a 7x7/2 conv, BN, ReLU, then a max pool over an explicitly zero-padded input
  (`ZeroPadding2D` + `MaxPooling2D`), not `nn.MaxPool2d`'s -inf padding; after the ReLU the two agree,
  but only because the input to the pool is non-negative, so the Keras form is kept;
* BatchNorm eps is 1.001e-5 (Keras momentum 0.99 is PyTorch momentum 0.01).

Keras's v1 takes 'caffe' input: BGR, mean-subtracted, 0-255. The converter folds the BGR swap into the
stem conv, so these models take RGB; the default cfg's mean (123.68, 116.779, 103.939)/255 and std 1/255
make timm's `resolve_data_config` + `create_transform` produce exactly Keras's `x - mean` (in RGB order).

Module names follow `resnetv2_keras` (`stem`, `stages.N.blocks.M`, `head.fc`) so the converter, `group_matcher`
and timm's pretrained-cfg handling treat both families alike; `keras.spec` maps each to its Keras layer.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, DropPath, calculate_drop_path_rates
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from .._timm_compat import feature_take_indices
from ..keras.spec import KERAS_RESNETS
from .keras_head import create_keras_head
from .keras_weights import keras_weights_url
from .resnetv2_keras import (
    _IMAGENET_LABEL_NAMES,
    BN_EPS,
    BN_MOMENTUM,
    EXPANSION,
    ZeroPadMaxPool2d,
    _check_args,
    conv2d,
    set_bn_eps,
    with_pretrained_weights,
)

__all__ = ['ResNetKeras', 'KERAS_CAFFE_MEAN', 'KERAS_CAFFE_STD']

STAGE_STRIDES = (1, 2, 2, 2)  # Keras `stride1` of conv2..conv5, applied by each stage's first block
# Keras `preprocess_input(mode='caffe')` subtracts the BGR means (103.939, 116.779, 123.68) from 0-255 BGR input;
# in timm's convention (0-1 RGB input, (x - mean) / std) that is these, once the stem conv takes RGB.
KERAS_CAFFE_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
KERAS_CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)

BatchNormReLU = partial(BatchNormAct2d, eps=BN_EPS, momentum=BN_MOMENTUM, act_layer=nn.ReLU)
BatchNormNoAct = partial(BatchNormAct2d, eps=BN_EPS, momentum=BN_MOMENTUM, apply_act=False)


class DownsampleKeras(nn.Module):
    """Keras's projection shortcut: 1x1 conv (biased, strided) + BN on the block input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = conv2d(in_chs, out_chs, 1, stride=stride)
        self.norm = BatchNormNoAct(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BottleneckKeras(nn.Module):
    """Keras `residual_block_v1`: 1x1 (strided) -> 3x3 -> 1x1, each biased and BN'd; ReLU after the add."""

    def __init__(
            self,
            in_chs: int,
            mid_chs: int,
            stride: int = 1,
            conv_shortcut: bool = False,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        out_chs = mid_chs * EXPANSION
        self.downsample = DownsampleKeras(in_chs, out_chs, stride) if conv_shortcut else None
        self.conv1 = conv2d(in_chs, mid_chs, 1, stride=stride)
        self.norm1 = BatchNormReLU(mid_chs)
        self.conv2 = conv2d(mid_chs, mid_chs, 3, padding=1)
        self.norm2 = BatchNormReLU(mid_chs)
        self.conv3 = conv2d(mid_chs, out_chs, 1)
        self.norm3 = BatchNormNoAct(out_chs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act3 = nn.ReLU()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class ResNetStageKeras(nn.Module):
    """Keras `stack_residual_blocks_v1`: the projection and the stride on the first block."""

    def __init__(self, in_chs: int, mid_chs: int, depth: int, stride: int, drop_path_rates: Sequence[float]):
        super().__init__()
        if depth < 1:
            raise ValueError(f'A Keras ResNet stage needs at least 1 block, got depth={depth}.')
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            BottleneckKeras(
                in_chs if i == 0 else mid_chs * EXPANSION,
                mid_chs,
                stride=stride if i == 0 else 1,
                conv_shortcut=i == 0,
                drop_path_rate=drop_path_rates[i],
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class ResNetKeras(nn.Module):
    """ResNet (He et al. 2015) with the exact layout of Keras's ResNet50/101/152.

    Feature taps (`feature_info`, `forward_intermediates`, `features_only=True`), one per reduction:

    | index | reduction | channels | tensor (Keras layer name, ResNet50)  |
    |-------|-----------|----------|--------------------------------------|
    | 0     | 2         | 64       | stem after BN + ReLU (`conv1_relu`)  |
    | 1     | 4         | 256      | stage 1 output (`conv2_block3_out`)  |
    | 2     | 8         | 512      | stage 2 output (`conv3_block4_out`)  |
    | 3     | 16        | 1024     | stage 3 output (`conv4_block6_out`)  |
    | 4     | 32        | 2048     | stage 4 output (`conv5_block3_out`)  |
    """

    def __init__(
            self,
            layers: Sequence[int],
            channels: Sequence[int] = (64, 128, 256, 512),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_chs: int = 64,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            bn_eps: float = BN_EPS,
            head_hidden: Sequence[int] = (),
            head_act: Union[str, Sequence[str]] = 'relu',
    ):
        """
        Args:
            layers: blocks per stage (Keras `stack_fn` block counts), e.g. (3, 4, 6, 3) for ResNet50.
            channels: bottleneck width per stage; stage outputs are 4x this.
            num_classes: classifier outputs; 0 removes the classifier (features only).
            in_chans: input image channels.
            global_pool: one of GLOBAL_POOL_TYPES ('' like Keras `pooling=None`, 'avg', 'max', ...).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, rising linearly over all blocks to this rate.
            zero_init_last: zero each block's last BN scale at init (timm's option; Keras does not).
            bn_eps, head_hidden, head_act: as in `ResNetV2Keras` (BatchNorm epsilon, a hidden-layer Keras head).
        """
        super().__init__()
        _check_args(num_classes=num_classes, in_chans=in_chans, global_pool=global_pool)
        if not len(layers) == len(channels) == len(STAGE_STRIDES):
            raise ValueError(
                f'layers and channels need {len(STAGE_STRIDES)} entries, one per stage, '
                f'got {len(layers)} and {len(channels)}.')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = nn.Sequential()
        self.stem.add_module('conv', conv2d(in_chans, stem_chs, 7, stride=2, padding=3))
        self.stem.add_module('norm', BatchNormReLU(stem_chs))
        self.stem.add_module('pool', ZeroPadMaxPool2d(3, stride=2, padding=1))
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='stem.norm')]

        block_dprs = calculate_drop_path_rates(drop_path_rate, list(layers), stagewise=False)
        self.stages = nn.Sequential()
        prev_chs, reduction, first_block = stem_chs, 4, 0
        for stage_idx, (depth, mid_chs, stride) in enumerate(zip(layers, channels, STAGE_STRIDES)):
            reduction *= stride
            self.stages.add_module(str(stage_idx), ResNetStageKeras(
                prev_chs, mid_chs, depth, stride, block_dprs[first_block:first_block + depth]))
            prev_chs = mid_chs * EXPANSION
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'stages.{stage_idx}'))
            first_block += depth

        self.num_taps = len(self.feature_info)
        self.num_features = prev_chs
        self.head = create_keras_head(self.num_features, num_classes, global_pool, drop_rate, head_hidden, head_act)
        self.head_hidden_size = self.head.num_features
        set_bn_eps(self, bn_eps)
        if not self.stem.conv.weight.is_meta:  # on the meta device it is built to be loaded: nothing to draw
            self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BottleneckKeras):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        _check_args(num_classes=num_classes, global_pool=global_pool)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (the taps in the class docstring).

        Args:
            x: Input image tensor.
            indices: Take last n taps if int, all if None, select matching indices if sequence.
            norm: Unused: v1 has no final norm (every stage output is already BN'd and ReLU'd).
            stop_early: Stop after the last tap that is taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return the intermediates alone.
        """
        if output_fmt != 'NCHW':
            # no f-string: TorchScript (`torch.jit.script` of a `features_only` model) cannot compile one
            raise ValueError("output_fmt must be 'NCHW', got '" + output_fmt + "'.")
        # written for TorchScript too: no slice of a module list with a variable bound, nor the (mixed-type)
        # `feature_info` dicts; `num_taps` stays what it was built with when stages are pruned
        take_indices, max_index = feature_take_indices(self.num_taps, indices)
        stop_at = max_index if stop_early else len(self.stages)
        intermediates: List[torch.Tensor] = []
        for i, layer in enumerate(self.stem):  # conv, BN + ReLU (the first tap), then pool (absent once pruned)
            if i < 2 or stop_at > 0:
                x = layer(x)
            if i == 1 and 0 in take_indices:
                intermediates.append(x)
        for stage_idx, stage in enumerate(self.stages):
            if stage_idx < stop_at:
                x = stage(x)
                if stage_idx + 1 in take_indices:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and the stem pool) that no tap in `indices` needs."""
        take_indices, max_index = feature_take_indices(self.num_taps, indices)
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem = self.stem[:2]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnet_keras(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetKeras:
    if pretrained:
        kwargs = with_pretrained_weights(variant, kwargs)
    return build_model_with_cfg(
        ResNetKeras, variant, pretrained,
        layers=KERAS_RESNETS[variant].block_counts,
        feature_cfg=dict(feature_cls='getter'),
        **kwargs,
    )


def _cfg(variant: str, **kwargs: Any) -> Dict[str, Any]:
    spec = KERAS_RESNETS[variant]
    return {
        'url': keras_weights_url(variant),  # makes timm list the weights; our hook resolves them (see keras_weights)
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        # Keras `preprocess_input` in 'caffe' mode, for RGB input (the converter folds the BGR swap into the stem)
        'mean': KERAS_CAFFE_MEAN, 'std': KERAS_CAFFE_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'mit',
        'min_input_size': (3, 32, 32),
        'paper_ids': 'arXiv:1512.03385',
        'paper_name': 'Deep Residual Learning for Image Recognition',
        'origin_url': 'https://keras.io/api/applications/resnet/',
        'notes': (f'Keras ImageNet weights; Keras reports {spec.top1}% top-1 at {spec.top1_size}x{spec.top1_size}.',),
        'label_names': _IMAGENET_LABEL_NAMES,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet50_keras.tf_in1k': _cfg('resnet50_keras'),
    'resnet101_keras.tf_in1k': _cfg('resnet101_keras'),
    'resnet152_keras.tf_in1k': _cfg('resnet152_keras'),
})


@register_model
def resnet50_keras(pretrained: bool = False, **kwargs: Any) -> ResNetKeras:
    """ResNet50 as `keras.applications.ResNet50`."""
    return _create_resnet_keras('resnet50_keras', pretrained=pretrained, **kwargs)


@register_model
def resnet101_keras(pretrained: bool = False, **kwargs: Any) -> ResNetKeras:
    """ResNet101 as `keras.applications.ResNet101`."""
    return _create_resnet_keras('resnet101_keras', pretrained=pretrained, **kwargs)


@register_model
def resnet152_keras(pretrained: bool = False, **kwargs: Any) -> ResNetKeras:
    """ResNet152 as `keras.applications.ResNet152`."""
    return _create_resnet_keras('resnet152_keras', pretrained=pretrained, **kwargs)
