"""ResNet50V2 / ResNet101V2 / ResNet152V2 exactly as `keras.applications.resnet_v2` builds them.

timm's own `resnetv2` is the same paper but not the same network, and Keras weights only carry over
to a network that repeats every Keras detail:

* the stride sits on the LAST block of each stage, whose shortcut is then a strided subsample of the
  block input (Keras: `MaxPooling2D(1, stride)`); timm strides the first block;
* the projection shortcut (first block of every stage) reads the pre-activation, with stride 1;
* every conv not followed by a BatchNorm has a bias: the stem, the projection and each block's last 1x1;
* the stem max-pool pads with zeros (`ZeroPadding2D` + `MaxPooling2D`); `nn.MaxPool2d` pads with -inf,
  which differs wherever the pooled stem output is negative;
* BatchNorm eps is 1.001e-5 (Keras momentum 0.99 is PyTorch momentum 0.01).

Module names follow timm's resnetv2 so timm tooling (`group_matcher`, `first_conv`, `classifier`)
works unchanged; `keras_names.py` maps each to its Keras layer name.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, ImageNetInfo
from timm.layers import BatchNormAct2d, DropPath, calculate_drop_path_rates
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from .._timm_compat import feature_take_indices
from ..keras.spec import KERAS_RESNETS
from .keras_head import create_keras_head
from .keras_weights import keras_weights_url

__all__ = ['ResNetV2Keras', 'GLOBAL_POOL_TYPES']

BN_EPS = 1.001e-5
BN_MOMENTUM = 0.01  # Keras momentum 0.99
EXPANSION = 4
STAGE_STRIDES = (2, 2, 2, 1)  # Keras `stride1` of conv2..conv5, applied by each stage's last block
# timm's pool types; the 'fast' ones (timm's benchmark.py `--gp fast`) compute the same with a mean/amax
GLOBAL_POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax',
                     'fastcatavgmax')

BatchNormReLU = partial(BatchNormAct2d, eps=BN_EPS, momentum=BN_MOMENTUM, act_layer=nn.ReLU)


class ZeroPadMaxPool2d(nn.Module):
    """Max pool over an explicitly zero-padded input (Keras `ZeroPadding2D` + `MaxPooling2D`)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding, self.padding, self.padding, self.padding))
        return F.max_pool2d(x, self.kernel_size, self.stride)


def conv2d(*args: Any, **kwargs: Any) -> nn.Conv2d:
    """`nn.Conv2d` without PyTorch's default initialisation: `init_weights` draws every conv weight again (or loading
    replaces it), and drawing twice was a third of the time to build a model. On the default device: the meta
    device where a model is built to be loaded (`weights.checkpoint.create_loaded`)."""
    return torch.nn.utils.skip_init(nn.Conv2d, *args, device=torch.get_default_device(), **kwargs)


class PreActBottleneckKeras(nn.Module):
    """Keras `residual_block_v2`: BN-ReLU pre-activation, then 1x1 -> 3x3 (strided) -> 1x1 (biased).

    The projection shortcut (`conv_shortcut=True`) is applied to the pre-activation; otherwise the
    shortcut is the raw input, subsampled by `stride` as Keras's 1x1 max pool does.
    """

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
        self.stride = stride
        self.norm1 = BatchNormReLU(in_chs)
        self.downsample = conv2d(in_chs, out_chs, 1, stride=stride) if conv_shortcut else None
        self.conv1 = conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = BatchNormReLU(mid_chs)
        self.conv2 = conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.norm3 = BatchNormReLU(mid_chs)
        self.conv3 = conv2d(mid_chs, out_chs, 1)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        else:
            shortcut = x[:, :, ::self.stride, ::self.stride]
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x) + shortcut


class ResNetStageKeras(nn.Module):
    """Keras `stack_residual_blocks_v2`: projection block first, the stride on the last block."""

    def __init__(
            self,
            in_chs: int,
            mid_chs: int,
            depth: int,
            stride: int,
            drop_path_rates: Sequence[float],
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f'A Keras ResNetV2 stage needs at least 2 blocks, got depth={depth}.')
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            PreActBottleneckKeras(
                in_chs if i == 0 else mid_chs * EXPANSION,
                mid_chs,
                stride=stride if i == depth - 1 else 1,
                conv_shortcut=i == 0,
                drop_path_rate=drop_path_rates[i],
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class ResNetV2Keras(nn.Module):
    """Pre-activation ResNet (He et al. 2016) with the exact layout of Keras's ResNet*V2.

    Feature taps (`feature_info`, `forward_intermediates`, `features_only=True`), one per reduction:

    | index | reduction | channels | tensor (Keras layer name, ResNet50V2)                   |
    |-------|-----------|----------|---------------------------------------------------------|
    | 0     | 2         | 64       | stem conv output (`conv1_conv`)                         |
    | 1     | 4         | 256      | stage 1 before its strided last block (`conv2_block2_out`) |
    | 2     | 8         | 512      | stage 2 before its strided last block (`conv3_block3_out`) |
    | 3     | 16        | 1024     | stage 3 before its strided last block (`conv4_block5_out`) |
    | 4     | 32        | 2048     | stage 4 output after `post_bn` + ReLU (`post_relu`)        |

    Because Keras strides the last block of a stage, a stage output is already at the next
    reduction; the taps are therefore taken one block earlier, where the resolution still matches.
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
            bn_eps: float = BN_EPS,
            head_hidden: Sequence[int] = (),
            head_act: Union[str, Sequence[str]] = 'relu',
    ):
        """
        Args:
            layers: blocks per stage (Keras `stack_fn` block counts), e.g. (3, 4, 6, 3) for 50V2.
            channels: bottleneck width per stage; stage outputs are 4x this.
            num_classes: classifier outputs; 0 removes the classifier (features only).
            in_chans: input image channels.
            global_pool: one of GLOBAL_POOL_TYPES ('' like Keras `pooling=None`, 'avg', 'max', ...).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, rising linearly over all blocks to this rate.
            bn_eps: every BatchNorm's epsilon (Keras's `BatchNormalization` default is 1e-3; the applications
                use 1.001e-5), so that models built by hand in Keras convert exactly.
            head_hidden: widths of hidden Dense layers between pooling and the classifier (a Keras MLP head).
            head_act: their activation(s): linear, relu, sigmoid, tanh or softmax.
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
        self.stem.add_module('pool', ZeroPadMaxPool2d(3, stride=2, padding=1))
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='stem.conv')]

        # number of blocks of each stage that run before its feature tap (see class docstring)
        self.stage_taps = [d - 1 if s > 1 else d for d, s in zip(layers, STAGE_STRIDES)]
        block_dprs = calculate_drop_path_rates(drop_path_rate, list(layers), stagewise=False)
        self.stages = nn.Sequential()
        prev_chs, reduction, first_block = stem_chs, 4, 0
        for stage_idx, (depth, mid_chs, stride) in enumerate(zip(layers, channels, STAGE_STRIDES)):
            self.stages.add_module(str(stage_idx), ResNetStageKeras(
                prev_chs, mid_chs, depth, stride, block_dprs[first_block:first_block + depth]))
            prev_chs = mid_chs * EXPANSION
            tap = self.stage_taps[stage_idx]
            module = f'stages.{stage_idx}' if tap == depth else f'stages.{stage_idx}.blocks.{tap - 1}'
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=module))
            reduction *= stride
            first_block += depth
        self.feature_info[-1]['module'] = 'norm'

        self.num_features = prev_chs
        self.norm = BatchNormReLU(self.num_features)
        self.head = create_keras_head(self.num_features, num_classes, global_pool, drop_rate, head_hidden, head_act)
        self.head_hidden_size = self.head.num_features
        set_bn_eps(self, bn_eps)
        if not self.stem.conv.weight.is_meta:  # on the meta device it is built to be loaded: nothing to draw
            self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

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
            norm: Unused: the last tap already is the `post_bn` + ReLU output, the only tensor it fits.
            stop_early: Stop after the last tap that is taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return the intermediates alone.
        """
        if output_fmt != 'NCHW':
            # no f-string: TorchScript (`torch.jit.script` of a `features_only` model) cannot compile one
            raise ValueError("output_fmt must be 'NCHW', got '" + output_fmt + "'.")
        # written for TorchScript too: `torch.jit.script` of a `features_only` model compiles this method, and it
        # takes no slice of a module list with a variable bound, nor the (mixed-type) `feature_info` dicts
        take_indices, max_index = feature_take_indices(len(self.stage_taps) + 1, indices)
        last_idx = len(self.stages)
        stop_at = max_index if stop_early else last_idx
        intermediates: List[torch.Tensor] = []
        for i, layer in enumerate(self.stem):  # conv, then pool (absent once pruned to the stem conv)
            if i == 0 or stop_at > 0:
                x = layer(x)
            if i == 0 and 0 in take_indices:
                intermediates.append(x)
        for stage_idx, stage in enumerate(self.stages):
            feat_idx = stage_idx + 1
            if feat_idx <= stop_at:
                tap = self.stage_taps[stage_idx]
                for block_idx, block in enumerate(stage.blocks):
                    if block_idx < tap:
                        x = block(x)
                if feat_idx == last_idx:
                    x = self.norm(x)
                if feat_idx in take_indices:
                    intermediates.append(x)
                if feat_idx < stop_at:
                    for block_idx, later_block in enumerate(stage.blocks):  # TorchScript: a new name per loop
                        if block_idx >= tap:
                            x = later_block(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers that no tap in `indices` needs (whole stages, and blocks after the tap).

        The final norm is kept whenever the last tap is taken, since that tap is its output.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem = self.stem[:1]
        elif prune_end:
            last = self.stages[-1]
            last.blocks = last.blocks[:self.stage_taps[max_index - 1]]
        if prune_end:
            self.norm = nn.Identity()  # sized for, and part of, the last tap only
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def set_bn_eps(model: nn.Module, eps: float) -> None:
    """Give every BatchNorm of `model` the epsilon `eps` (one Keras model uses one value; see the converter)."""
    if not eps > 0:
        raise ValueError(f'bn_eps must be > 0, got {eps}.')
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = eps


def _check_args(num_classes: int = 0, in_chans: int = 1, global_pool: Optional[str] = None) -> None:
    """Reject bad constructor arguments with a ValueError instead of a late shape error or assert."""
    if num_classes < 0:
        raise ValueError(f'num_classes must be >= 0 (0 removes the classifier), got {num_classes}.')
    if in_chans < 1:
        raise ValueError(f'in_chans must be >= 1, got {in_chans}.')
    if global_pool is not None and global_pool not in GLOBAL_POOL_TYPES:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOL_TYPES}, got {global_pool!r}.')


# `pretrained=True` hook: `resnetv2_zoo/__init__.py` sets it to `weights.pretrained.pretrained_kwargs`, which
# finds, fetches and converts the Keras weights on first use. Set from outside so that this file never
# imports the converter, which itself depends on the model: no import cycle, not even a lazy one.
_pretrained_kwargs: Optional[Callable[[str, Dict[str, Any]], Dict[str, Any]]] = None


def set_pretrained_hook(hook: Callable[[str, Dict[str, Any]], Dict[str, Any]]) -> None:
    """Install the function that points a `pretrained=True` request at converted Keras weights."""
    global _pretrained_kwargs
    _pretrained_kwargs = hook


def with_pretrained_weights(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` pointed at the converted Keras weights of `variant` by the hook (both model families use it)."""
    return _pretrained_kwargs(variant, kwargs) if _pretrained_kwargs is not None else kwargs


def _create_resnetv2_keras(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetV2Keras:
    if pretrained:
        kwargs = with_pretrained_weights(variant, kwargs)
    return build_model_with_cfg(
        ResNetV2Keras, variant, pretrained,
        layers=KERAS_RESNETS[variant].block_counts,
        feature_cfg=dict(feature_cls='getter'),
        **kwargs,
    )


_IMAGENET_LABEL_NAMES = tuple(ImageNetInfo().label_names())  # WordNet ids, as Keras `decode_predictions` names classes


def _cfg(variant: str, **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': keras_weights_url(variant),  # makes timm list the weights; our hook resolves them (see keras_weights)
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'test_input_size': (3, 299, 299), 'test_pool_size': (10, 10),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        # Keras `preprocess_input` in 'tf' mode: x / 127.5 - 1
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'min_input_size': (3, 32, 32),
        'paper_ids': 'arXiv:1603.05027',
        'paper_name': 'Identity Mappings in Deep Residual Networks',
        'origin_url': 'https://keras.io/api/applications/resnet/',
        'notes': (f'Keras ImageNet weights; Keras reports {KERAS_RESNETS[variant].top1}% top-1 at 299x299.',),
        'label_names': _IMAGENET_LABEL_NAMES,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet50v2_keras.tf_in1k': _cfg('resnet50v2_keras'),
    'resnet101v2_keras.tf_in1k': _cfg('resnet101v2_keras'),
    'resnet152v2_keras.tf_in1k': _cfg('resnet152v2_keras'),
})


@register_model
def resnet50v2_keras(pretrained: bool = False, **kwargs: Any) -> ResNetV2Keras:
    """ResNet50V2 as `keras.applications.ResNet50V2`."""
    return _create_resnetv2_keras('resnet50v2_keras', pretrained=pretrained, **kwargs)


@register_model
def resnet101v2_keras(pretrained: bool = False, **kwargs: Any) -> ResNetV2Keras:
    """ResNet101V2 as `keras.applications.ResNet101V2`."""
    return _create_resnetv2_keras('resnet101v2_keras', pretrained=pretrained, **kwargs)


@register_model
def resnet152v2_keras(pretrained: bool = False, **kwargs: Any) -> ResNetV2Keras:
    """ResNet152V2 as `keras.applications.ResNet152V2`."""
    return _create_resnetv2_keras('resnet152v2_keras', pretrained=pretrained, **kwargs)
