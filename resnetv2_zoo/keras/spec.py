"""Everything this package knows about Keras's ResNets, in one place: the architectures and the layer names.

`KERAS_RESNETS` holds, per timm architecture, what Keras's `applications/resnet.py` and
`resnet_v2.py` hold: the application, the block counts per stage, the weight files and their MD5s
(`WEIGHTS_HASHES`) and the published top-1. The model entry points, the converter, `pretrained=True`
and `--verify` all read it, so a fact about an architecture is written once.

The rest is the one table between Keras layer names and our parameter names. Weights are matched by
layer name, never by order or shape: in `conv2_block1`, `0_conv` (the projection shortcut) and
`3_conv` have the same shape, so any positional or shape-based matching can silently swap them
(tensorflow/tensorflow#33459).
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

KERAS_WEIGHTS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/resnet/'


@dataclass(frozen=True)
class KerasResNet:
    """One Keras ResNet application and its official ImageNet weights."""

    arch: str  # timm model name
    keras_app: str  # attribute of `keras.applications`
    block_counts: Tuple[int, int, int, int]  # residual blocks per stage, conv2..conv5
    weights_md5: Tuple[str, str]  # MD5 of the official weights (with top, without top), Keras's WEIGHTS_HASHES
    top1_299: float  # Keras's published ImageNet top-1 (%), at 299 px

    def weights_file_name(self, include_top: bool = True) -> str:
        """File name Keras gives the official weights, e.g. `resnet50v2_weights_tf_dim_ordering_tf_kernels.h5`."""
        return f'{self.keras_app.lower()}_weights_tf_dim_ordering_tf_kernels{"" if include_top else "_notop"}.h5'

    def expected_md5(self, include_top: bool = True) -> str:
        return self.weights_md5[0 if include_top else 1]


KERAS_RESNETS: Dict[str, KerasResNet] = {spec.arch: spec for spec in (
    KerasResNet('resnet50v2_keras', 'ResNet50V2', (3, 4, 6, 3),
                ('3ef43a0b657b3be2300d5770ece849e0', 'fac2f116257151a9d068a22e544a4917'), 76.0),
    KerasResNet('resnet101v2_keras', 'ResNet101V2', (3, 4, 23, 3),
                ('6343647c601c52e1368623803854d971', 'c0ed64b8031c3730f411d2eb4eea35b5'), 77.2),
    KerasResNet('resnet152v2_keras', 'ResNet152V2', (3, 8, 36, 3),
                ('a49b44d1979771252814e80f8ec446f9', 'ed17cf2e0169df9d443503ef94b23b33'), 78.0),
)}

# Keras layer name -> module name, for the layers outside the residual blocks.
TOP_LEVEL_LAYERS: Dict[str, str] = {
    'conv1_conv': 'stem.conv',
    'post_bn': 'norm',
    'predictions': 'head.fc',
}

# Keras `convN_blockM_<suffix>` -> `stages.{N-2}.blocks.{M-1}.<module>`.
BLOCK_LAYERS: Dict[str, str] = {
    'preact_bn': 'norm1',
    '0_conv': 'downsample',
    '1_conv': 'conv1',
    '1_bn': 'norm2',
    '2_conv': 'conv2',
    '2_bn': 'norm3',
    '3_conv': 'conv3',
}

# Keras variable name -> PyTorch tensor name, per layer kind, in the order Keras stores them.
CONV_VARS: Dict[str, str] = {'kernel': 'weight', 'bias': 'bias'}
CONV_NO_BIAS_VARS: Dict[str, str] = {'kernel': 'weight'}  # the 1x1 and 3x3 convs that a BN follows
DENSE_VARS: Dict[str, str] = {'kernel': 'weight', 'bias': 'bias'}
BN_VARS: Dict[str, str] = {
    'gamma': 'weight',
    'beta': 'bias',
    'moving_mean': 'running_mean',
    'moving_variance': 'running_var',
}

FIRST_STAGE = 2  # Keras numbers the stages conv2..conv5
_BLOCK_RE = re.compile(r'^conv(?P<stage>\d+)_block(?P<block>\d+)_(?P<suffix>' + '|'.join(BLOCK_LAYERS) + r')$')


def module_for_layer(layer: str) -> str:
    """Module name of the Keras layer `layer`; KeyError for a name that is not a ResNetV2 weight layer."""
    if layer in TOP_LEVEL_LAYERS:
        return TOP_LEVEL_LAYERS[layer]
    match = _BLOCK_RE.match(layer)
    if match is None:
        raise KeyError(layer)
    stage, block = int(match['stage']) - FIRST_STAGE, int(match['block']) - 1
    if stage < 0 or block < 0:
        raise KeyError(layer)
    return f'stages.{stage}.blocks.{block}.{BLOCK_LAYERS[match["suffix"]]}'


def layer_vars(layer: str) -> Dict[str, str]:
    """Keras variable name -> PyTorch tensor name for `layer`."""
    if layer == 'predictions':
        return DENSE_VARS
    if layer.endswith('_bn'):
        return BN_VARS
    if layer.endswith(('_1_conv', '_2_conv')):
        return CONV_NO_BIAS_VARS
    return CONV_VARS


# Block layers in `model.layers` order. Keras sorts a functional model's layers by graph depth, so
# the projection `0_conv` comes after `2_bn`, not where `residual_block_v2` creates it.
BLOCK_LAYER_ORDER = ('preact_bn', '1_conv', '1_bn', '2_conv', '2_bn', '0_conv', '3_conv')

def keras_layer_names(block_counts: Sequence[int], include_top: bool) -> List[str]:
    """Weight layers of a Keras ResNetV2 in `model.layers` order, the order `.weights.h5` numbers them in."""
    names = ['conv1_conv']
    for stage, depth in enumerate(block_counts, start=FIRST_STAGE):
        for block in range(1, depth + 1):
            names += [f'conv{stage}_block{block}_{s}' for s in BLOCK_LAYER_ORDER if block == 1 or s != '0_conv']
    names.append('post_bn')
    if include_top:
        names.append('predictions')
    return names


def keras_class(layer: str) -> str:
    """The Keras layer class of a ResNetV2 weight layer, as `.weights.h5` spells it."""
    if layer == 'predictions':
        return 'dense'
    return 'batch_normalization' if layer.endswith('_bn') else 'conv2d'


def to_torch_layout(array: np.ndarray) -> torch.Tensor:
    """Keras conv kernels are HWIO and dense kernels (in, out); PyTorch wants OIHW and (out, in).

    Returns a transposed view, not a copy: `load_state_dict` copies into the parameters anyway, and
    a separate transposing copy would cost more than reading the file. Call `.contiguous()` before
    serializing such a tensor directly.
    """
    tensor = torch.from_numpy(array)
    if tensor.ndim == 4:
        return tensor.permute(3, 2, 0, 1)
    if tensor.ndim == 2:
        return tensor.T
    return tensor


def iter_tensor_names(layer: str) -> Iterator[Tuple[str, str]]:
    """(Keras variable name, full PyTorch state-dict key) for every variable of `layer`."""
    module = module_for_layer(layer)
    for keras_var, torch_var in layer_vars(layer).items():
        yield keras_var, f'{module}.{torch_var}'
