"""Keras ResNetV2 models with seeded random weights, saved by Keras itself in every format the converter reads.

Random weights are scaled so activations stay moderate through 152 layers (logits of order 1-100):
He-normal kernels, each residual branch's last 1x1 conv scaled down, and BatchNorm statistics and
affine parameters drawn near identity, with positive variances.
"""
import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import h5py
import numpy as np
from filelock import FileLock

from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.weights.verify import keras_reference_model

RESIDUAL_BRANCH_SCALE = 0.2  # on each block's `3_conv` kernel
FILE_LOCK_TIMEOUT_S = 600  # another pytest worker writing the same ~100 MB file takes seconds


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


class KerasResNet:
    """One Keras ResNetV2 with seeded random weights, with and without the top, its files and its outputs.

    Built once and shared (conftest's session fixture for ResNet50V2): tests read it and never change it;
    a test that trains or edits a Keras model builds its own with `build_keras_resnetv2`. Files are
    written on first request, read-only too: copy one before damaging it. `directory` may be shared by
    several processes (conftest's is, by the xdist workers of one run): the seeded weights are the same in
    each, so the first to ask writes a file, under a lock, and the others use it.
    """

    def __init__(self, arch: str, directory: Path, seed: int = 1):
        keras = import_keras()
        self.arch = arch
        self.top = build_keras_resnetv2(arch, include_top=True, seed=seed)
        self.notop = keras_reference_model(arch, 0)  # any input size, average-pooled
        copy_weights_by_name(self.top, self.notop)
        # one Keras forward for all three outputs: the top's classifier on the no-top model's average pool
        # (so logits at any size), and a global max pool of post_relu
        logits = self.top.get_layer('predictions')(self.notop.output)
        max_pooled = keras.layers.GlobalMaxPooling2D()(self.notop.get_layer('post_relu').output)
        self._outputs = keras.Model(self.notop.input, [logits, self.notop.output, max_pooled])
        self.directory = Path(directory)
        self._files: Dict[Tuple[bool, str], Path] = {}

    def model(self, include_top: bool) -> Any:
        return self.top if include_top else self.notop

    def outputs(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Keras's 'logits', 'avg' and 'max' (pooled features) on an NCHW float32 batch of any size."""
        outputs = self._outputs(images.transpose(0, 2, 3, 1), training=False)
        return {name: np.asarray(out) for name, out in zip(('logits', 'avg', 'max'), outputs)}

    def file(self, include_top: bool, file_format: str) -> Path:
        """The model saved by Keras in `file_format` (FILE_FORMATS, or 'weights_h5_unnamed' /
        'keras_zip_unnamed': as Keras < 3.6 wrote them), under `directory`/top or /notop."""
        key = (include_top, file_format)
        if key not in self._files:
            out = self.directory / ('top' if include_top else 'notop')
            out.mkdir(parents=True, exist_ok=True)
            name = {'weights_h5_unnamed': 'unnamed.weights.h5', 'keras_zip_unnamed': 'unnamed.keras'}.get(
                file_format) or SAVERS[file_format][0]
            path = out / name
            with FileLock(str(out / f'.{name}.lock'), timeout=FILE_LOCK_TIMEOUT_S):
                if not path.is_file():  # written into a private folder, then renamed: a file that is there is whole
                    partial = out / f'.{name}.{os.getpid()}'
                    partial.mkdir()
                    try:
                        if file_format == 'weights_h5_unnamed':
                            written = strip_weights_h5_names(self.file(include_top, 'weights_h5'), partial / name)
                        elif file_format == 'keras_zip_unnamed':
                            written = strip_keras_zip_names(self.file(include_top, 'keras_zip'), partial / name)
                        else:
                            written = save_keras(self.model(include_top), partial, file_format)
                        written.rename(path)
                    finally:
                        shutil.rmtree(partial, ignore_errors=True)
            self._files[key] = path
        return self._files[key]


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
