"""Writers of the ResNet (v1) file layouts that Keras 3 itself cannot write: TF.js layers models and Keras 2
`.h5` files under the original 2017 layer names (`conv1`, `bn_conv1`, `res2a_branch2a`, ..., `fc1000`).

Both are written from `{layer: {variable: array}}` in Keras layout, with h5py / json / numpy only, as
tensorflowjs_converter and Keras 2's `save_weights` lay them out.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import h5py
import numpy as np

from resnetv2_zoo.keras.spec import keras_class, keras_layer_names, legacy_layer_name

LayerWeights = Dict[str, Dict[str, np.ndarray]]
# Keras 2's variable order per layer kind, as `layer.weights` lists them.
VAR_ORDER = {
    'conv2d': ('kernel', 'bias'),
    'dense': ('kernel', 'bias'),
    'batch_normalization': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
}


def keras_model_layers(model: Any) -> LayerWeights:
    """`{layer name: {variable: array}}` of a live Keras model."""
    return {layer.name: {v.name.split('/')[-1].split(':')[0]: np.asarray(v.numpy()) for v in layer.weights}
            for layer in model.layers if layer.weights}


def to_legacy_names(layers: LayerWeights, block_counts: Sequence[int]) -> LayerWeights:
    """keras.applications v1 names -> the original 2017 names."""
    return {legacy_layer_name(name, block_counts): value for name, value in layers.items()}


def _class_of(layer: str) -> str:
    if layer == 'fc1000' or layer == 'predictions':
        return 'dense'
    return 'batch_normalization' if layer.startswith('bn') or layer.endswith('_bn') else 'conv2d'


def write_tfjs(layers: LayerWeights, folder: Path, shard_bytes: int = 4 << 20, dtype: str = 'float32') -> Path:
    """A TF.js layers model: model.json (weightsManifest, one group, names sorted as the converter lists them)
    and `group1-shardNofM.bin` files of `shard_bytes` each (the last shorter)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, blobs = [], []
    for layer in sorted(layers):
        for var in VAR_ORDER[_class_of(layer)]:
            value = np.ascontiguousarray(layers[layer][var], dtype='<f4')
            entries.append(dict(name=f'{layer}/{var}', shape=list(value.shape), dtype=dtype))
            blobs.append(value.tobytes())
    data = b''.join(blobs)
    count = max(1, math.ceil(len(data) / shard_bytes))
    paths = [f'group1-shard{i + 1}of{count}.bin' for i in range(count)]
    for i, name in enumerate(paths):
        (folder / name).write_bytes(data[i * shard_bytes:(i + 1) * shard_bytes])
    model = dict(format='layers-model', generatedBy='keras v2.2.4-tf', convertedBy='TensorFlow.js Converter v1.2.6',
                 modelTopology=dict(keras_version='2.2.4-tf', backend='tensorflow'),
                 weightsManifest=[dict(paths=paths, weights=entries)])
    (folder / 'model.json').write_text(json.dumps(model))
    return folder


def write_keras2_h5(layers: LayerWeights, path: Path, layer_order: Optional[Sequence[str]] = None) -> Path:
    """A Keras 2 `save_weights` file: `layer_names` (every layer, those without weights too, in model order),
    and per layer a group with `weight_names` such as `conv1/kernel:0` and one dataset per variable."""
    order = list(layer_order) if layer_order is not None else list(layers)
    with h5py.File(path, 'w') as h5:
        h5.attrs['layer_names'] = [name.encode() for name in order]
        h5.attrs['backend'] = b'tensorflow'
        h5.attrs['keras_version'] = b'2.0.8'
        for layer in order:
            group = h5.create_group(layer)
            weight_names = []
            if layer in layers:
                for var in VAR_ORDER[_class_of(layer)]:
                    weight_names.append(f'{layer}/{var}:0')
                    group[weight_names[-1]] = np.asarray(layers[layer][var], dtype=np.float32)
            group.attrs['weight_names'] = [name.encode() for name in weight_names]
    return path


def v1_layer_order(block_counts: Sequence[int], include_top: bool = True) -> list:
    """Weight layers of a Keras ResNet (v1), keras.applications names, in `model.layers` order."""
    names = keras_layer_names(block_counts, include_top, family='v1')
    assert all(keras_class(n) == _class_of(n) for n in names)
    return names
