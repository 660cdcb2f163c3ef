"""Keras ResNetV2 models with seeded random weights, saved by Keras itself in every format the converter reads.

Random weights are scaled so activations stay moderate through 152 layers (logits of order 1-100):
He-normal kernels, each residual branch's last 1x1 conv scaled down, and BatchNorm statistics and
affine parameters drawn near identity, with positive variances.
"""
import io
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict

import h5py
import numpy as np

from resnetv2_zoo.weights.verify import keras_reference_model

RESIDUAL_BRANCH_SCALE = 0.2  # on each block's `3_conv` kernel


def build_keras_resnetv2(arch: str, include_top: bool = True, num_classes: int = 1000, seed: int = 0) -> Any:
    """Keras's own ResNetV2 (logits; without a top any input size, avg-pooled) with seeded random weights."""
    model = keras_reference_model(arch, num_classes if include_top else 0)
    randomize_weights(model, seed)
    return model


def randomize_weights(model: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = layer.get_weights()
        if not values:
            continue
        kind = type(layer).__name__
        if kind == 'BatchNormalization':
            size = values[0].shape
            values = [rng.uniform(0.5, 1.5, size), rng.uniform(-0.2, 0.2, size),
                      rng.uniform(-0.2, 0.2, size), rng.uniform(0.5, 1.5, size)]
        elif kind in ('Conv2D', 'Dense'):
            kernel = values[0]
            fan_in = int(np.prod(kernel.shape[:-1]))
            std = np.sqrt(2.0 / fan_in) if kind == 'Conv2D' else np.sqrt(1.0 / fan_in)
            if layer.name.endswith('_3_conv'):
                std *= RESIDUAL_BRANCH_SCALE
            values = [rng.normal(0.0, std, kernel.shape)] + [rng.uniform(-0.1, 0.1, v.shape) for v in values[1:]]
        else:
            raise AssertionError(f'unexpected layer with weights: {layer.name} ({kind})')
        layer.set_weights([v.astype(np.float32) for v in values])


def copy_weights_by_name(source: Any, target: Any) -> None:
    """Give `target` the weights of the layers of the same name in `source` (e.g. a top model -> its no-top)."""
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())


def _save_legacy_weights(model: Any, path: Path) -> None:
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, 'w') as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


# Keras-written file per format, as `(file name, writer)`; the keys are the converter's `source_format`.
SAVERS: Dict[str, tuple] = {
    'legacy_h5_weights': ('weights_legacy.h5', _save_legacy_weights),
    'legacy_h5_model': ('model.h5', lambda model, path: model.save(path)),
    'weights_h5': ('model.weights.h5', lambda model, path: model.save_weights(path)),
    'keras_zip': ('model.keras', lambda model, path: model.save(path)),
}
FILE_FORMATS = tuple(SAVERS)


def save_keras(model: Any, directory: Path, file_format: str) -> Path:
    """Save `model` with Keras itself in `file_format` (one of FILE_FORMATS) under `directory`."""
    name, writer = SAVERS[file_format]
    path = Path(directory) / name
    writer(model, path)
    return path


def strip_weights_h5_names(src: Path, dst: Path) -> Path:
    """A `.weights.h5` as Keras < 3.6 wrote it: no `name` attributes, no groups for layers without weights."""
    dst.write_bytes(_strip_names(src.read_bytes()))
    return dst


def strip_keras_zip_names(src: Path, dst: Path) -> Path:
    """A `.keras` archive whose `model.weights.h5` is stripped as in `strip_weights_h5_names`."""
    _rewrite_zip_member(src, dst, 'model.weights.h5', _strip_names)
    return dst


def _rewrite_zip_member(src: Path, dst: Path, member: str, rewrite: Callable[[bytes], bytes]) -> None:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, 'w') as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info, rewrite(data) if info.filename == member else data)


def _strip_names(h5_bytes: bytes) -> bytes:
    buffer = io.BytesIO(h5_bytes)
    with h5py.File(buffer, 'a') as h5:
        for key in list(h5['layers']):
            vars_group = h5['layers'][key]['vars']
            if len(vars_group):
                del vars_group.attrs['name']
            else:
                del h5['layers'][key]
        if 'vars' in h5 and 'name' in h5['vars'].attrs:
            del h5['vars'].attrs['name']
    return buffer.getvalue()


def write_legacy_h5(state_dict: Dict[str, Any], arch: str, path: Path, dtype: str = 'float32') -> Path:
    """A Keras 2 layout `.h5` (as `save_weights_to_hdf5_group` writes it) from a timm state dict, without Keras.

    The inverse of the converter's mapping, for tests that need many or damaged files quickly; the files
    Keras itself writes are covered by `save_keras`.
    """
    from resnetv2_zoo.keras.spec import KERAS_RESNETS, iter_tensor_names, keras_layer_names

    include_top = 'head.fc.weight' in state_dict
    layers = keras_layer_names(KERAS_RESNETS[arch].block_counts, include_top)
    with h5py.File(path, 'w') as h5:
        h5.attrs['layer_names'] = [name.encode() for name in layers]
        h5.attrs['keras_version'] = b'2.2.4'
        for layer in layers:
            group = h5.create_group(layer)
            weight_names = []
            for keras_var, key in iter_tensor_names(layer):
                value = state_dict[key].detach().numpy()
                if value.ndim == 4:
                    value = value.transpose(2, 3, 1, 0)
                elif value.ndim == 2:
                    value = value.T
                weight_names.append(f'{layer}/{keras_var}:0')
                group[weight_names[-1]] = np.ascontiguousarray(value).astype(dtype)
            group.attrs['weight_names'] = [name.encode() for name in weight_names]
    return path
