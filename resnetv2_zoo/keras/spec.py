"""Everything this package knows about Keras's ResNets, in one place: the architectures and the layer names.

`KERAS_RESNETS` holds, per timm architecture, what Keras's `applications/resnet.py` and
`resnet_v2.py` hold: the application, the block counts per stage, the weight files and their MD5s
(`WEIGHTS_HASHES`) and the published top-1. The model entry points, the converter, `pretrained=True`
and `--verify` all read it, so a fact about an architecture is written once.

The rest is the one table between Keras layer names and our parameter names, for both families:
ResNetV2 (`family='v2'`) and ResNet v1 (`family='v1'`), the latter under both of its spellings, the
keras.applications names (`conv2_block1_1_conv`) and the original Keras 2 names of the 2017 ResNet50
release (`res2a_branch2a`; see `canonical_layer_name`). Weights are matched by layer name, never by
order or shape: in `conv2_block1`, `0_conv` (the projection shortcut) and `3_conv` have the same
shape, so any positional or shape-based matching can silently swap them (tensorflow/tensorflow#33459).
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

KERAS_WEIGHTS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/resnet/'


@dataclass(frozen=True)
class KerasResNet:
    """One Keras ResNet application and its official ImageNet weights."""

    arch: str  # timm model name
    keras_app: str  # attribute of `keras.applications`
    block_counts: Tuple[int, int, int, int]  # residual blocks per stage, conv2..conv5
    weights_md5: Tuple[str, str]  # MD5 of the official weights (with top, without top), Keras's WEIGHTS_HASHES
    top1: float  # Keras's published ImageNet top-1 (%), keras.io/api/applications
    top1_size: int = 299  # input size of the model card's top-1 figure
    family: str = 'v2'  # 'v2': keras.applications.resnet_v2 (pre-activation); 'v1': keras.applications.resnet

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
    KerasResNet('resnet50_keras', 'ResNet50', (3, 4, 6, 3),
                ('2cb95161c43110f7111970584f804107', '4d473c1dd8becc155b73f8504c6f6626'), 74.9, 224, 'v1'),
    KerasResNet('resnet101_keras', 'ResNet101', (3, 4, 23, 3),
                ('f1aeb4b969a6efcfb50fad2f0c20cfc5', '88cf7a10940856eca736dc7b7e228a21'), 76.4, 224, 'v1'),
    KerasResNet('resnet152_keras', 'ResNet152', (3, 8, 36, 3),
                ('100835be76be38e30d865e96f2aaae62', 'ee4c566cf9a93f14d82f913c2dc6dd0c'), 76.6, 224, 'v1'),
)}

FAMILIES = ('v1', 'v2')

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

# ResNet v1 (`keras.applications.resnet`, `residual_block_v1`): post-activation, every conv biased.
V1_TOP_LEVEL_LAYERS: Dict[str, str] = {
    'conv1_conv': 'stem.conv',
    'conv1_bn': 'stem.norm',
    'predictions': 'head.fc',
}
V1_BLOCK_LAYERS: Dict[str, str] = {
    '0_conv': 'downsample.conv',
    '0_bn': 'downsample.norm',
    '1_conv': 'conv1',
    '1_bn': 'norm1',
    '2_conv': 'conv2',
    '2_bn': 'norm2',
    '3_conv': 'conv3',
    '3_bn': 'norm3',
}

FIRST_STAGE = 2  # Keras numbers the stages conv2..conv5
_BLOCK_RE = {
    'v2': re.compile(r'^conv(?P<stage>\d+)_block(?P<block>\d+)_(?P<suffix>' + '|'.join(BLOCK_LAYERS) + r')$'),
    'v1': re.compile(r'^conv(?P<stage>\d+)_block(?P<block>\d+)_(?P<suffix>' + '|'.join(V1_BLOCK_LAYERS) + r')$'),
}


def _tables(family: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    if family == 'v2':
        return TOP_LEVEL_LAYERS, BLOCK_LAYERS
    if family == 'v1':
        return V1_TOP_LEVEL_LAYERS, V1_BLOCK_LAYERS
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')


def module_for_layer(layer: str, family: str = 'v2') -> str:
    """Module name of the Keras layer `layer`; KeyError for a name that is not a weight layer of `family`."""
    top_level, block_layers = _tables(family)
    if layer in top_level:
        return top_level[layer]
    match = _BLOCK_RE[family].match(layer)
    if match is None:
        raise KeyError(layer)
    stage, block = int(match['stage']) - FIRST_STAGE, int(match['block']) - 1
    if stage < 0 or block < 0:
        raise KeyError(layer)
    return f'stages.{stage}.blocks.{block}.{block_layers[match["suffix"]]}'


def layer_vars(layer: str, family: str = 'v2') -> Dict[str, str]:
    """Keras variable name -> PyTorch tensor name for `layer`."""
    if layer == 'predictions':
        return DENSE_VARS
    if layer.endswith('_bn'):
        return BN_VARS
    if family == 'v2' and layer.endswith(('_1_conv', '_2_conv')):
        return CONV_NO_BIAS_VARS
    return CONV_VARS  # v1: every conv has a bias, even those a BatchNorm follows


# Block layers in `model.layers` order. Keras sorts a functional model's layers by graph depth, so
# the projection `0_conv` comes after `2_bn`, not where `residual_block_v2` creates it.
BLOCK_LAYER_ORDER = ('preact_bn', '1_conv', '1_bn', '2_conv', '2_bn', '0_conv', '3_conv')
V1_BLOCK_LAYER_ORDER = ('1_conv', '1_bn', '2_conv', '2_bn', '0_conv', '3_conv', '0_bn', '3_bn')


def keras_layer_names(block_counts: Sequence[int], include_top: bool, family: str = 'v2') -> List[str]:
    """Weight layers of a Keras ResNet in `model.layers` order, the order `.weights.h5` numbers them in."""
    _tables(family)  # validates `family`
    order = BLOCK_LAYER_ORDER if family == 'v2' else V1_BLOCK_LAYER_ORDER
    names = ['conv1_conv'] if family == 'v2' else ['conv1_conv', 'conv1_bn']
    for stage, depth in enumerate(block_counts, start=FIRST_STAGE):
        for block in range(1, depth + 1):
            names += [f'conv{stage}_block{block}_{s}' for s in order if block == 1 or not s.startswith('0_')]
    if family == 'v2':
        names.append('post_bn')
    if include_top:
        names.append('predictions')
    return names


# --- the original Keras 2 names of ResNet (v1) ---
# Keras 2's `resnet50.py` (2017, the official `resnet50_weights_tf_dim_ordering_tf_kernels.h5` and the TF.js
# export of it) named layers as the Caffe release of ResNet did: `conv1`, `bn_conv1`, `res2a_branch2a`,
# `bn2a_branch2a`, ..., `res2a_branch1` (projection), `fc1000`; block letters a, b, c, ... per stage.
# No Keras release used them for ResNet101/152; the Caffe release numbered their long stages
# `res4a`, `res4b1` ... `res4b22`. Both block spellings are read; `legacy_layer_name` writes the Caffe one.
LEGACY_TOP_LEVEL: Dict[str, str] = {'conv1': 'conv1_conv', 'bn_conv1': 'conv1_bn', 'fc1000': 'predictions'}
LEGACY_BRANCHES: Dict[str, str] = {'branch2a': '1', 'branch2b': '2', 'branch2c': '3', 'branch1': '0'}
_LEGACY_BLOCK_RE = re.compile(
    r'^(?P<kind>res|bn)(?P<stage>[2-9])(?P<letter>[a-z])(?P<number>\d*)_'
    r'(?P<branch>' + '|'.join(LEGACY_BRANCHES) + r')$')
_CANONICAL_V1_RE = re.compile(r'^conv(?P<stage>\d)_block(?P<block>\d+)_(?P<branch>[0-3])_(?P<kind>conv|bn)$')
_LEGACY_TOP_LEVEL_INV = {v: k for k, v in LEGACY_TOP_LEVEL.items()}
_BRANCHES_INV = {v: k for k, v in LEGACY_BRANCHES.items()}


def is_legacy_layer_name(layer: str) -> bool:
    """True for a layer name of the original Keras 2 / Caffe ResNet spelling (`res2a_branch2a`, `fc1000`)."""
    return layer in LEGACY_TOP_LEVEL or _LEGACY_BLOCK_RE.match(layer) is not None


def canonical_layer_name(layer: str) -> str:
    """The keras.applications name of an original-spelling layer (`res2a_branch2a` -> `conv2_block1_1_conv`,
    `res4b22_branch2c` -> `conv4_block23_3_conv`); any other name is returned unchanged."""
    if layer in LEGACY_TOP_LEVEL:
        return LEGACY_TOP_LEVEL[layer]
    match = _LEGACY_BLOCK_RE.match(layer)
    if match is None:
        return layer
    letter, number = match['letter'], match['number']
    if number:  # Caffe's numbering of long stages: `b1` is the second block
        if letter != 'b' or int(number) < 1:
            return layer
        block = int(number) + 1
    else:
        block = ord(letter) - ord('a') + 1
    kind = 'conv' if match['kind'] == 'res' else 'bn'
    return f'conv{match["stage"]}_block{block}_{LEGACY_BRANCHES[match["branch"]]}_{kind}'


def legacy_layer_name(layer: str, block_counts: Sequence[int]) -> str:
    """The original spelling of a v1 keras.applications layer name (the inverse of `canonical_layer_name`):
    block letters where Keras 2's ResNet50 used them, Caffe's `b1`, `b2`, ... for the long stages of 101/152."""
    if layer in _LEGACY_TOP_LEVEL_INV:
        return _LEGACY_TOP_LEVEL_INV[layer]
    match = _CANONICAL_V1_RE.match(layer)
    if match is None:
        return layer
    stage, block = int(match['stage']), int(match['block'])
    depth = block_counts[stage - FIRST_STAGE] if 0 <= stage - FIRST_STAGE < len(block_counts) else block
    numbered = sum(block_counts) > 16 and depth > 3  # ResNet101/152 in Caffe: res3b1.., res4b1..
    token = 'a' if block == 1 else (f'b{block - 1}' if numbered or block > 26 else chr(ord('a') + block - 1))
    prefix = 'res' if match['kind'] == 'conv' else 'bn'
    return f'{prefix}{stage}{token}_{_BRANCHES_INV[match["branch"]]}'


def keras_class(layer: str) -> str:
    """The Keras layer class of a ResNet weight layer (either family), as `.weights.h5` spells it."""
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


def iter_tensor_names(layer: str, family: str = 'v2') -> Iterator[Tuple[str, str]]:
    """(Keras variable name, full PyTorch state-dict key) for every variable of `layer`."""
    module = module_for_layer(layer, family)
    for keras_var, torch_var in layer_vars(layer, family).items():
        yield keras_var, f'{module}.{torch_var}'


# --- input preprocessing ---
# How the pixels were prepared for the Keras model, as `keras.applications.*.preprocess_input` modes plus the two
# a model trained from an image folder sees: each maps RGB 0-255 pixels x to the model input x * scale + offset per
# channel, in the model's channel order (BGR for 'caffe').
PREPROCESS_MODES = ('tf', 'torch', 'caffe', 'raw', 'unit')
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def preprocess_affine(mode: str) -> Tuple[Tuple[float, ...], Tuple[float, ...], bool]:
    """(scale, offset, bgr) of a preprocessing mode:

    tf: x / 127.5 - 1 (resnet_v2); torch: (x / 255 - ImageNet mean) / std; caffe: BGR, x - ImageNet BGR mean
    (resnet v1); raw: x (`image_dataset_from_directory` pixels); unit: x / 255 (`Rescaling(1/255)` outside).
    """
    if mode == 'tf':
        return (1 / 127.5,) * 3, (-1.0,) * 3, False
    if mode == 'torch':
        scale = tuple(1 / (255 * s) for s in IMAGENET_DEFAULT_STD)
        return scale, tuple(-m / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)), False
    if mode == 'caffe':
        return (1.0,) * 3, tuple(-m for m in _CAFFE_BGR_MEAN), True
    if mode == 'raw':
        return (1.0,) * 3, (0.0,) * 3, False
    if mode == 'unit':
        return (1 / 255,) * 3, (0.0,) * 3, False
    raise ValueError(f'unknown preprocessing {mode!r}; expected one of {", ".join(PREPROCESS_MODES)}')


def default_preprocess(family: str) -> str:
    """The preprocessing of the official weights: 'tf' for ResNetV2, 'caffe' for ResNet (v1)."""
    return 'tf' if family == 'v2' else 'caffe'
