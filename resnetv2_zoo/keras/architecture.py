"""What a Keras model file declares around its ResNet base: input layers, BatchNorm epsilon, pooling and head.

A `.keras` archive (`config.json`) and a full-model `.h5` (`model_config`) carry the model's architecture;
weights alone do not say that a fine-tuned model pools by max, ends in `Dense(32, 'relu') -> Dense(4)`,
divides its input by 255 or was built by hand with Keras's default BatchNorm epsilon (1e-3, not the
applications' 1.001e-5), and each of these changes the outputs. This module reads that architecture from
the config, in the dialects Keras 2 and Keras 3 write, with the ResNet base inline or as a sub-model at any
depth and under any name, inside `Sequential` or `Functional` models.

The model must be one path: input -> input layers -> the ResNet -> pooling -> Dense/Dropout/Activation.
Anything a timm model cannot compute exactly (a conv or BatchNorm in the head, `Flatten` of a feature map,
two inputs, layer classes Keras does not ship) is refused with a `KerasFileError` naming the layer, its
class and what is supported. Nothing here imports TensorFlow or torch.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import KerasFileError

__all__ = ['DenseLayer', 'KerasArchitecture', 'read_architecture', 'feature_map_size', 'keras_activation',
           'BASE_ENTRY', 'base_terminal', 'HIDDEN_ACTIVATIONS', 'OUTPUT_ACTIVATIONS']

BASE_ENTRY = 'conv1_pad'  # the first layer of every Keras ResNet (v1 and V2)
MODEL_CLASSES = ('Functional', 'Model', 'Sequential')
INPUT_CLASS = 'InputLayer'
# The layers of a Keras ResNet body, and the activation its Activation layers must have.
BODY_CLASSES = ('ZeroPadding2D', 'Conv2D', 'BatchNormalization', 'Activation', 'ReLU', 'MaxPooling2D', 'Add')
# Identity at inference (data augmentation and regularisation), so they do not change the outputs.
INFERENCE_IDENTITY = ('RandomFlip', 'RandomRotation', 'RandomZoom', 'RandomTranslation', 'RandomContrast',
                      'RandomBrightness', 'GaussianNoise', 'GaussianDropout', 'AlphaDropout', 'Dropout',
                      'SpatialDropout2D', 'ActivityRegularization')
INPUT_AFFINE = ('Rescaling', 'Normalization')
POOLING = {'GlobalAveragePooling2D': 'avg', 'GlobalMaxPooling2D': 'max'}
HIDDEN_ACTIVATIONS = ('linear', 'relu', 'sigmoid', 'tanh', 'softmax')
OUTPUT_ACTIVATIONS = ('linear', 'softmax', 'sigmoid')
KERAS_NORM_EPSILON = 1e-7  # Normalization divides by max(sqrt(variance), keras.backend.epsilon())
SUPPORTED_INPUT = (f'before the ResNet: {", ".join(INPUT_AFFINE)} and augmentation layers '
                   f'({", ".join(INFERENCE_IDENTITY)})')
SUPPORTED_HEAD = ('after the ResNet: GlobalAveragePooling2D or GlobalMaxPooling2D, Flatten of a pooled vector, Dense, '
                  f'Dropout, Activation, ReLU and Softmax layers (activations {", ".join(HIDDEN_ACTIVATIONS)})')


@dataclass
class DenseLayer:
    name: str
    units: int
    activation: str  # one of HIDDEN_ACTIVATIONS (OUTPUT_ACTIVATIONS for the last)


@dataclass
class KerasArchitecture:
    """The model around the ResNet base, as the file declares it."""

    bn_eps: Optional[float]  # every BatchNormalization of the base has it; None if the base has none
    pooling: str  # 'avg', 'max', or '' (the model outputs the feature map)
    dense: List[DenseLayer]  # after pooling, in order; the last is the classifier
    dropout: float  # the largest Dropout rate after the base (training only)
    # y = x * input_scale + input_offset per channel (the model's channel order): the Rescaling/Normalization
    # layers before the base, composed; identity when there are none
    input_scale: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_offset: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    input_layers: List[str] = field(default_factory=list)  # 'Rescaling rescaling', ... for messages
    weighted_input_layers: List[str] = field(default_factory=list)  # adapted Normalization layers (their weights)
    input_size: Optional[Tuple[int, int]] = None  # fixed (height, width) of the outermost Input
    base_path: str = ''  # where the base sits, e.g. 'functional/resnet50v2'
    ignored: List[str] = field(default_factory=list)  # augmentation layers, identity at inference

    @property
    def output_activation(self) -> str:
        return self.dense[-1].activation if self.dense else 'linear'


def base_terminal(family: str, block_counts: Sequence[int]) -> str:
    """The name of a Keras ResNet's last layer: `post_relu` (V2), `conv5_blockN_out` (v1)."""
    return 'post_relu' if family == 'v2' else f'conv5_block{block_counts[-1]}_out'


def feature_map_size(size: int) -> int:
    """Height (or width) of a Keras ResNet's last feature map for an input of `size`: five halvings, rounded up."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


def keras_activation(value: Any) -> Optional[str]:
    """'relu' from 'relu', or from Keras 3's serialized form {'class_name': 'function', 'config': 'relu', ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get('config'), str):
        return value['config']
    if value is None:
        return 'linear'
    return None


# --- one layer of a config, in either dialect ---------------------------------------------------------------

@dataclass
class _Layer:
    name: str
    cls: str
    config: Dict[str, Any]
    raw: Dict[str, Any]
    where: str

    def describe(self) -> str:
        return f'layer {self.name!r} ({self.cls})'

    def inbound(self) -> List[List[str]]:
        """Per call of the layer, the names of the layers it reads (Keras 2 lists, Keras 3 `keras_history`)."""
        nodes = self.raw.get('inbound_nodes') or []
        if not isinstance(nodes, list):
            raise KerasFileError(f'{self.where}: {self.describe()} has inbound_nodes {type(nodes).__name__}')
        return [list(_history_names(node)) for node in nodes]


def _history_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        history = node.get('keras_history') if node.get('class_name') != '__keras_tensor__' else None
        if node.get('class_name') == '__keras_tensor__':
            history = (node.get('config') or {}).get('keras_history')
        if isinstance(history, list) and history and isinstance(history[0], str):
            yield history[0]
            return
        for value in node.values():
            yield from _history_names(value)
    elif isinstance(node, list):
        if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):  # Keras 2: [name, node, i, {}]
            yield node[0]
            return
        for value in node:
            yield from _history_names(value)


def _layer(raw: Any, where: str) -> _Layer:
    if not isinstance(raw, dict) or not isinstance(raw.get('class_name'), str):
        raise KerasFileError(f'{where}: a layer entry without a class_name')
    config = raw.get('config') if isinstance(raw.get('config'), dict) else {}
    name = raw.get('name') if isinstance(raw.get('name'), str) else config.get('name')
    if not isinstance(name, str):
        raise KerasFileError(f'{where}: a {raw["class_name"]} layer without a name')
    return _Layer(name, raw['class_name'], config, raw, where)


def _single_ref(value: Any, what: str, where: str) -> str:
    """`['dense_1', 0, 0]` or `[['dense_1', 0, 0]]` -> 'dense_1'; two or more -> refused."""
    refs = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
    if len(refs) != 1 or not isinstance(refs[0], list) or not refs[0] or not isinstance(refs[0][0], str):
        names = ', '.join(repr(r[0]) for r in refs if isinstance(r, list) and r and isinstance(r[0], str))
        raise KerasFileError(f'{where}: the model has {len(refs)} {what}s ({names}); supported: one image input and '
                             'one output')
    return refs[0][0]


# --- the walk ------------------------------------------------------------------------------------------------

@dataclass
class _Item:
    kind: str  # 'input', 'layer', 'base'
    layer: Optional[_Layer] = None
    body: Optional[List[_Layer]] = None
    path: str = ''


class _Reader:
    def __init__(self, terminal: str, where: str):
        self.terminal = terminal
        self.where = where

    def chain(self, model: Dict[str, Any], path: str) -> List[_Item]:
        """The layers of `model` from its input to its output, sub-models expanded, the ResNet body as one item."""
        cls = model.get('class_name')
        config = model.get('config')
        if not isinstance(config, dict) or not isinstance(config.get('layers'), list):
            raise KerasFileError(f'{self.where}: the {cls} model {path or "(top level)"} has no layer list')
        layers = [_layer(raw, self.where) for raw in config['layers']]
        if cls == 'Sequential':
            return self._sequential(model, layers, path)
        return self._functional(config, layers, path)

    def _expand(self, layer: _Layer, path: str) -> List[_Item]:
        if layer.cls in MODEL_CLASSES:
            return self.chain(layer.raw, f'{path}/{layer.name}' if path else layer.name)
        return [_Item('input' if layer.cls == INPUT_CLASS else 'layer', layer, path=path)]

    def _sequential(self, model: Dict[str, Any], layers: List[_Layer], path: str) -> List[_Item]:
        items: List[_Item] = []
        config = model['config']
        if layers and layers[0].cls != INPUT_CLASS:  # Keras 2 puts the input shape on the first layer
            shape = layers[0].config.get('batch_input_shape') or config.get('build_input_shape')
            if shape is not None:
                items.append(_Item('input', _Layer(f'{layers[0].name}_input', INPUT_CLASS,
                                                   {'batch_input_shape': shape}, {}, self.where), path=path))
        for layer in layers:
            if layer.name == self.terminal or layer.name == BASE_ENTRY:
                raise KerasFileError(f'{self.where}: {layer.describe()} of the ResNet sits directly in a Sequential '
                                     'model, which cannot hold a ResNet; the file is not a Keras ResNet')
            items.extend(self._expand(layer, path))
        return items

    def _functional(self, config: Dict[str, Any], layers: List[_Layer], path: str) -> List[_Item]:
        by_name = {layer.name: layer for layer in layers}
        _single_ref(config.get('input_layers'), 'input', self.where)
        current: Optional[str] = _single_ref(config.get('output_layers'), 'output', self.where)
        visited, items = set(), []
        while current is not None:
            layer = by_name.get(current)
            if layer is None:
                raise KerasFileError(f'{self.where}: model {path or "(top level)"} refers to a layer {current!r} '
                                     'it does not have')
            if layer.name == self.terminal:
                body = self._body(layer, by_name)
                visited.update(b.name for b in body)
                items.append(_Item('base', body=body, path=path))
                layer = by_name[BASE_ENTRY]
            else:
                visited.add(layer.name)
                items.extend(reversed(self._expand(layer, path)))
            if layer.cls == INPUT_CLASS:
                break
            current = self._single_inbound(layer)
        unused = [layer for layer in layers if layer.name not in visited]
        if unused:
            raise KerasFileError(f'{self.where}: {unused[0].describe()} is not on the one path from the model\'s '
                                 'input to its output; supported: a single chain input -> ResNet -> head')
        return list(reversed(items))

    def _single_inbound(self, layer: _Layer) -> Optional[str]:
        nodes = layer.inbound()
        if len(nodes) != 1 or len(nodes[0]) != 1:
            calls = f'is called {len(nodes)} times' if len(nodes) != 1 else f'reads {len(nodes[0])} tensors'
            raise KerasFileError(f'{self.where}: {layer.describe()} {calls}; supported: one chain from a single '
                                 'input through the ResNet to the output (no shared layers, no second input)')
        return nodes[0][0]

    def _body(self, terminal: _Layer, by_name: Dict[str, _Layer]) -> List[_Layer]:
        """Every layer from the ResNet's first (`conv1_pad`) to its last, found by walking back from the last."""
        if BASE_ENTRY not in by_name:
            raise KerasFileError(f'{self.where}: the model has the ResNet layer {terminal.name!r} but no '
                                 f'{BASE_ENTRY!r} in the same model; the file is not a Keras ResNet')
        body, stack, seen = [], [terminal.name], {terminal.name}
        while stack:
            layer = by_name[stack.pop()]
            body.append(layer)
            if layer.cls not in BODY_CLASSES:
                raise KerasFileError(f'{self.where}: {layer.describe()} inside the ResNet is not a layer Keras\'s '
                                     f'ResNet has ({", ".join(BODY_CLASSES)})')
            if layer.name == BASE_ENTRY:
                continue
            for node in layer.inbound():
                for name in node:
                    if name not in by_name:
                        raise KerasFileError(f'{self.where}: {layer.describe()} reads {name!r}, which is not a layer '
                                             'of the model holding the ResNet')
                    if name not in seen:
                        seen.add(name)
                        stack.append(name)
        return body


# --- interpreting the chain ---------------------------------------------------------------------------------

def read_architecture(model_config: Any, family: str, block_counts: Sequence[int], where: str,
                      weights: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> KerasArchitecture:
    """The architecture `model_config` ({'class_name': ..., 'config': ...}) declares around its Keras ResNet.

    `weights` (by layer name) supplies the statistics of an adapted `Normalization` layer.
    """
    if not isinstance(model_config, dict) or model_config.get('class_name') not in MODEL_CLASSES:
        found = model_config.get('class_name') if isinstance(model_config, dict) else type(model_config).__name__
        raise KerasFileError(f'{where}: the model config is a {found}, expected a Functional or Sequential model')
    items = _Reader(base_terminal(family, block_counts), where).chain(model_config, '')
    bases = [i for i, item in enumerate(items) if item.kind == 'base']
    if len(bases) != 1:
        raise KerasFileError(f'{where}: the model holds {len(bases)} Keras ResNets; supported: exactly one')
    before, base, after = items[:bases[0]], items[bases[0]], items[bases[0] + 1:]
    _check_strides(base.body, family, block_counts, where)
    arch = KerasArchitecture(bn_eps=_bn_eps(base.body, where), pooling='', dense=[], dropout=0.0,
                             base_path=base.path or '(top level)')
    _read_input(before, arch, where, weights or {})
    _read_head(after, arch, where)
    return arch


_CONV_RE = re.compile(r'^conv(?P<stage>[2-5])_block(?P<block>\d+)_(?P<part>[0-3])_conv$')


def expected_stride(name: str, family: str, block_counts: Sequence[int]) -> int:
    """The stride keras.applications gives the conv `name`: V2 strides each stage's last block in its 3x3 conv
    (stages conv2-conv4), v1 each stage's first block in its first 1x1 conv and projection (conv3-conv5)."""
    if name == 'conv1_conv':
        return 2
    match = _CONV_RE.match(name)
    if match is None:
        return 1
    stage, block, part = int(match['stage']), int(match['block']), match['part']
    if family == 'v2':
        return 2 if stage < 5 and block == block_counts[stage - 2] and part == '2' else 1
    return 2 if stage > 2 and block == 1 and part in ('0', '1') else 1


def _check_strides(body: List[_Layer], family: str, block_counts: Sequence[int], where: str) -> None:
    """A ResNet built by hand with the applications' names but a stride elsewhere would load the weights and
    compute something else: refused, naming the conv."""
    for layer in body:
        if layer.cls != 'Conv2D':
            continue
        strides = layer.config.get('strides', 1)
        strides = tuple(strides) if isinstance(strides, list) else (strides, strides)
        expected = expected_stride(layer.name, family, block_counts)
        dilation = layer.config.get('dilation_rate', 1)
        dilation = tuple(dilation) if isinstance(dilation, list) else (dilation, dilation)
        if strides != (expected, expected) or dilation != (1, 1) or layer.config.get('groups', 1) != 1:
            raise KerasFileError(f'{where}: {layer.describe()} has strides {list(strides)}, dilation {list(dilation)}, '
                                 f'groups {layer.config.get("groups", 1)}; Keras\'s {family.upper()} ResNet has '
                                 f'strides [{expected}, {expected}], dilation [1, 1], groups 1 there')


def _bn_eps(body: List[_Layer], where: str) -> Optional[float]:
    values: Dict[float, str] = {}
    for layer in body:
        if layer.cls == 'Activation' and keras_activation(layer.config.get('activation')) != 'relu':
            raise KerasFileError(f'{where}: {layer.describe()} inside the ResNet has activation '
                                 f'{layer.config.get("activation")!r}; Keras\'s ResNet uses relu')
        if layer.cls == 'Conv2D' and keras_activation(layer.config.get('activation')) != 'linear':
            raise KerasFileError(f'{where}: {layer.describe()} inside the ResNet has activation '
                                 f'{layer.config.get("activation")!r}; Keras\'s ResNet convs have none')
        if layer.cls == 'BatchNormalization':
            eps = layer.config.get('epsilon')
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
                raise KerasFileError(f'{where}: {layer.describe()} has epsilon {eps!r}, expected a number > 0')
            values.setdefault(float(eps), layer.name)
    if len(values) > 1:
        shown = ', '.join(f'{eps:g} ({name})' for eps, name in list(values.items())[:3])
        raise KerasFileError(f'{where}: the ResNet\'s BatchNormalization layers have different epsilons: {shown}; '
                             'supported: one epsilon for the whole network')
    return next(iter(values)) if values else None


def _read_input(items: List[_Item], arch: KerasArchitecture, where: str,
                weights: Dict[str, Dict[str, np.ndarray]]) -> None:
    scale, offset = np.ones(3), np.zeros(3)
    for index, item in enumerate(items):
        layer = item.layer
        if item.kind == 'input':  # the outermost Input decides; a sub-model's own Input only checks channels
            size = _input_size(layer, where)
            if index == 0:
                arch.input_size = size
            continue
        if layer.cls in INFERENCE_IDENTITY:
            arch.ignored.append(f'{layer.cls} {layer.name}')
            continue
        if layer.cls == 'Rescaling':
            a = _channel_values(layer.config.get('scale', 1.0), layer, 'scale', where)
            b = _channel_values(layer.config.get('offset', 0.0), layer, 'offset', where)
        elif layer.cls == 'Normalization':
            a, b = _normalization(layer, where, weights)
            if layer.config.get('mean') is None:
                arch.weighted_input_layers.append(layer.name)
        else:
            raise KerasFileError(f'{where}: {layer.describe()} before the ResNet is not supported; '
                                 f'supported {SUPPORTED_INPUT}')
        scale, offset = scale * a, offset * a + b
        arch.input_layers.append(f'{layer.cls} {layer.name}')
    arch.input_scale = tuple(float(v) for v in scale)
    arch.input_offset = tuple(float(v) for v in offset)


def _input_size(layer: _Layer, where: str) -> Optional[Tuple[int, int]]:
    shape = layer.config.get('batch_shape') or layer.config.get('batch_input_shape')
    if not isinstance(shape, list) or len(shape) != 4:
        if shape is None:
            return None
        raise KerasFileError(f'{where}: input {layer.name!r} has shape {shape}; expected (batch, height, width, 3)')
    _, height, width, channels = shape
    if channels != 3:
        raise KerasFileError(f'{where}: input {layer.name!r} has {channels} channels (shape {shape}); supported: '
                             '3 (RGB images, channels last)')
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _channel_values(value: Any, layer: _Layer, key: str, where: str) -> np.ndarray:
    """A scalar or per-channel (3) number from a layer config, as 3 floats."""
    array = np.asarray(value, dtype=np.float64) if _is_numeric(value) else None
    if array is None or array.size not in (1, 3):
        raise KerasFileError(f'{where}: {layer.describe()} has {key} {value!r}; supported: a number or one per '
                             'channel (3)')
    return np.broadcast_to(array.reshape(-1), (3,)).astype(np.float64)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, list) and all(_is_numeric(v) for v in value)


def _normalization(layer: _Layer, where: str, weights: Dict[str, Dict[str, np.ndarray]]) -> Tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Keras `Normalization`: (x - mean) / max(sqrt(variance), 1e-7), per channel, as x * a + b."""
    config = layer.config
    axis = config.get('axis', -1)
    if axis not in (-1, 3, [-1], [3]) or config.get('invert'):
        raise KerasFileError(f'{where}: {layer.describe()} normalizes over axis {axis!r}'
                             f'{" inverted" if config.get("invert") else ""}; supported: the channel axis (-1)')
    if config.get('mean') is not None:
        mean = _channel_values(config['mean'], layer, 'mean', where)
        variance = _channel_values(config.get('variance'), layer, 'variance', where)
    else:
        found = weights.get(layer.name, {})
        mean, variance = found.get('mean', found.get('0')), found.get('variance', found.get('1'))
        if mean is None or variance is None:
            raise KerasFileError(f'{where}: {layer.describe()} has no mean and variance in its config or weights')
        mean = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (3,))
        variance = np.broadcast_to(np.asarray(variance, np.float64).reshape(-1), (3,))
    std = np.maximum(np.sqrt(variance), KERAS_NORM_EPSILON)
    return 1.0 / std, -mean / std


def _read_head(items: List[_Item], arch: KerasArchitecture, where: str) -> None:
    pooled = False
    for item in items:
        layer = item.layer
        if item.kind != 'layer':
            raise KerasFileError(f'{where}: {layer.describe() if layer else "a second ResNet"} after the ResNet is not '
                                 f'supported; supported {SUPPORTED_HEAD}')
        cls, config = layer.cls, layer.config
        if cls in POOLING:
            if pooled:
                raise KerasFileError(f'{where}: {layer.describe()} pools a second time; supported: one global pooling')
            if config.get('keepdims'):
                raise KerasFileError(f'{where}: {layer.describe()} keeps the spatial dimensions (keepdims=True); '
                                     'supported: keepdims=False')
            arch.pooling, pooled = POOLING[cls], True
        elif cls == 'Flatten':
            if not pooled:
                size = arch.input_size
                if size is None or (feature_map_size(size[0]), feature_map_size(size[1])) != (1, 1):
                    shown = (f'{feature_map_size(size[0])}x{feature_map_size(size[1])}' if size else
                             'of any size (the input size is not fixed)')
                    raise KerasFileError(f'{where}: {layer.describe()} flattens the ResNet\'s feature map '
                                         f'({shown}), not a pooled vector; supported: global pooling before Dense')
                arch.pooling, pooled = 'avg', True  # a 1x1 map: flattening it is pooling it
        elif cls in ('Dropout', 'AlphaDropout', 'GaussianDropout', 'GaussianNoise', 'ActivityRegularization'):
            rate = config.get('rate', 0.0)
            arch.dropout = max(arch.dropout, float(rate) if _is_numeric(rate) and not isinstance(rate, list) else 0.0)
        elif cls == 'Dense':
            if not pooled:
                raise KerasFileError(f'{where}: {layer.describe()} reads the ResNet\'s feature map, not a pooled '
                                     'vector; supported: GlobalAveragePooling2D or GlobalMaxPooling2D before Dense')
            activation = keras_activation(config.get('activation'))
            if activation not in HIDDEN_ACTIVATIONS:
                raise KerasFileError(f'{where}: {layer.describe()} has activation {config.get("activation")!r}; '
                                     f'supported: {", ".join(HIDDEN_ACTIVATIONS)}')
            units = config.get('units')
            if not isinstance(units, int) or units < 1:
                raise KerasFileError(f'{where}: {layer.describe()} has units {units!r}, expected a count >= 1')
            arch.dense.append(DenseLayer(layer.name, units, activation))
        elif cls in ('Activation', 'ReLU', 'Softmax'):
            _apply_activation(layer, arch, where)
        else:
            raise KerasFileError(f'{where}: {layer.describe()} after the ResNet is not supported; '
                                 f'supported {SUPPORTED_HEAD}')
    if arch.dense and arch.output_activation not in OUTPUT_ACTIVATIONS:
        last = arch.dense[-1]
        raise KerasFileError(f'{where}: the last Dense {last.name!r} ends in {last.activation}; supported as the '
                             f'output activation: {", ".join(OUTPUT_ACTIVATIONS)}')


def _apply_activation(layer: _Layer, arch: KerasArchitecture, where: str) -> None:
    """An activation layer after a Dense becomes that Dense's activation (if it had none)."""
    config = layer.config
    if layer.cls == 'Activation':
        activation = keras_activation(config.get('activation'))
    elif layer.cls == 'Softmax':
        activation = 'softmax' if config.get('axis', -1) in (-1, 1, [-1], [1]) else None
    else:  # ReLU: plain only
        plain = (config.get('max_value') is None and not config.get('negative_slope')
                 and not config.get('threshold'))
        activation = 'relu' if plain else None
    if activation not in HIDDEN_ACTIVATIONS:
        raise KerasFileError(f'{where}: {layer.describe()} computes {activation or "an unsupported variant"}; '
                             f'supported: {", ".join(HIDDEN_ACTIVATIONS)}')
    if activation == 'linear':
        return
    if not arch.dense or arch.dense[-1].activation != 'linear':
        what = 'directly on the pooled features' if not arch.dense else f'after {arch.dense[-1].name!r}, which ' \
            f'already applies {arch.dense[-1].activation}'
        raise KerasFileError(f'{where}: {layer.describe()} applies {activation} {what}; supported: one activation '
                             'per Dense layer')
    arch.dense[-1].activation = activation
