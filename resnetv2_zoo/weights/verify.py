"""`convert --verify`: run Keras on the checkpoint it was given and compare with the converted model.

The only converter code that imports TensorFlow (through `keras.runtime`), and only when asked.
"""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..errors import ResNetV2ZooError
from ..keras import runtime
from ..keras.files import read_keras_weights
from ..keras.spec import (
    KERAS_RESNETS,
    canonical_layer_name,
    default_preprocess,
    is_legacy_layer_name,
    preprocess_affine,
)
from ..keras.tf_checkpoint import find_tf_format, read_tf_layout
from .convert import ConvertedKeras, build_model

PathLike = Union[str, os.PathLike]
TOLERANCE = 1e-5  # max |keras - ours| <= TOLERANCE * max(1, max |keras|), float32


def parity_tolerance(reference: Union[np.ndarray, torch.Tensor]) -> float:
    """The largest max |reference - ours| that counts as equal: float32 round-off, relative to large outputs."""
    return TOLERANCE * max(1.0, float(abs(reference).max()))


@dataclass
class Verification:
    max_abs_diff: float
    tolerance: float
    output: str  # 'logits' or 'pooled features'

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = 'PASS' if self.passed else 'FAIL'
        return (f'verify: max |keras - timm| over the {self.output} = {self.max_abs_diff:.3g} '
                f'(tolerance {self.tolerance:.3g}): {verdict}')


def keras_reference_model(arch: str, num_classes: int) -> Any:
    """The Keras model a checkpoint of `arch` loads into: logits with a top, average-pooled features without."""
    app = getattr(runtime.import_keras().applications, KERAS_RESNETS[arch].keras_app)
    if num_classes:
        return app(weights=None, include_top=True, classes=num_classes, classifier_activation=None)
    return app(weights=None, include_top=False, pooling='avg', input_shape=(None, None, 3))


def verify_against_keras(source: Union[PathLike, Any], converted: ConvertedKeras, image_size: int = 224,
                         batch_size: int = 2, seed: int = 0) -> Verification:
    """Run Keras and the converted model on one seeded batch of pixels, each prepared its own way.

    Keras runs the model in the file where the file holds one (`keras.saving.load_model` for `.keras` and
    full-model `.h5`; Keras 2's loader for what Keras 2 wrote), else the keras.applications model built with
    the same options and given the file's weights. Keras gets the pixels preprocessed as the conversion says
    (`tf`, `raw`, ...), ours gets timm's normalization with the converted mean/std: equal outputs check the
    whole conversion, preprocessing included.
    """
    record = converted.record or {}
    try:
        if isinstance(source, (str, os.PathLike)) and converted.metadata['source_format'] in TF_FORMATS:
            keras_model = tf_keras_model(Path(source), converted)
        elif isinstance(source, (str, os.PathLike)) and converted.metadata['source_format'] in FULL_MODEL_FORMATS:
            keras_model = load_keras_model(Path(source), converted)
        elif isinstance(source, (str, os.PathLike)):
            keras_model = _weights_only_reference(Path(source), converted)
        else:
            keras_model = source
    except ImportError as e:
        raise ResNetV2ZooError(f'--verify needs TensorFlow and Keras: {e}') from e
    size = converted.pretrained_cfg.get('input_size', (3, image_size, image_size))[1:]
    pixels = torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)) * 255
    # `tf_keras_model` gives logits already; elsewhere the last Dense is made to, where it holds the activation
    tf_format = isinstance(source, (str, os.PathLike)) and converted.metadata['source_format'] in TF_FORMATS
    logits_compared = tf_format or _drop_output_activation(keras_model, record)
    try:
        keras_out = np.asarray(keras_model(keras_pixels_input(pixels, _preprocess(converted)),
                                           training=False))
    except Exception as e:  # Keras's own errors, as one line
        raise ResNetV2ZooError(f'--verify: Keras could not run the model in {source}: {type(e).__name__}: '
                               f'{str(e).splitlines()[0] if str(e) else ""}') from e
    model = build_model(converted)
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg['mean']).view(1, 3, 1, 1), torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model((pixels / 255 - mean) / std)
        if not logits_compared and converted.num_classes:
            ours = ours.sigmoid() if converted.output_activation == 'sigmoid' else (
                ours.softmax(dim=1) if converted.output_activation == 'softmax' else ours)
        ours = ours.numpy()
    if keras_out.ndim == 4 and ours.ndim == 4:  # feature maps: Keras is NHWC
        keras_out = keras_out.transpose(0, 3, 1, 2)
    elif keras_out.ndim == 4 and not converted.num_classes:  # a no-top SavedModel without pooling: feature maps
        keras_out = keras_out.mean(axis=(1, 2))
    diff = float(np.abs(keras_out - ours).max()) if keras_out.shape == ours.shape else float('inf')
    output = ('logits' if logits_compared else 'probabilities') if converted.num_classes else (
        'pooled features' if ours.ndim == 2 else 'feature maps')
    return Verification(diff, parity_tolerance(keras_out), output)


FULL_MODEL_FORMATS = ('keras_zip', 'legacy_h5_model')


def _preprocess(converted: ConvertedKeras) -> str:
    """The conversion's preprocessing; that of the official weights for a conversion that records none."""
    return (converted.record or {}).get('preprocess') or default_preprocess(KERAS_RESNETS[converted.arch].family)


def load_keras_model(path: Path, converted: ConvertedKeras) -> Any:
    """The model in a `.keras` or full-model `.h5` file, loaded by Keras itself (Keras 2 for what Keras 2 wrote)."""
    keras2 = converted.metadata.get('keras_version', '').startswith('2.')
    keras = runtime.import_tf_keras() if keras2 else runtime.import_keras()
    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as e:  # Keras raises many kinds; each becomes one line
        raise ResNetV2ZooError(f'--verify: Keras {"2" if keras2 else "3"} cannot load {path}: {type(e).__name__}: '
                               f'{str(e).splitlines()[0] if str(e) else ""}') from e


def _weights_only_reference(path: Path, converted: ConvertedKeras) -> Any:
    """keras.applications' model with the conversion's options (eps, pooling, head), holding the file's weights.

    Where the file has the applications' layout (no top, or its `predictions` top, average pooling) Keras loads
    the file itself, which checks our reader too; a head of other Dense layers is rebuilt and given the weights
    by layer name.
    """
    record = converted.record or {}
    head = record.get('head', [])
    keras = runtime.import_keras()
    if record.get('pooling', 'avg') == 'avg' and [layer['name'] for layer in head] in ([], ['predictions']):
        model = keras_reference_model(converted.arch, converted.num_classes)
        _keras_load_weights(model, path, converted.metadata['source_format'])
        if head:  # built for logits; given the recorded activation, which the comparison then takes off again
            model.get_layer('predictions').activation = getattr(keras.activations, head[-1]['activation'])
    else:
        app = getattr(keras.applications, KERAS_RESNETS[converted.arch].keras_app)
        base = app(weights=None, include_top=False, input_shape=(None, None, 3))
        x = base.output
        pooling = record.get('pooling', 'avg')
        if pooling:
            x = (keras.layers.GlobalMaxPooling2D() if pooling == 'max' else keras.layers.GlobalAveragePooling2D())(x)
        for layer in head:
            x = keras.layers.Dense(layer['units'], activation=layer['activation'], name=layer['name'])(x)
        model = keras.Model(base.input, x)
        weights = read_keras_weights(path)
        set_keras_weights_by_name(model, {canonical_layer_name(k): v for k, v in weights.layers.items()})
    if record.get('bn_eps') is not None:
        for layer in model.layers:
            if type(layer).__name__ == 'BatchNormalization':
                layer.epsilon = record['bn_eps']
    return model


def _drop_output_activation(keras_model: Any, record: Dict[str, Any]) -> bool:
    """Make the model's last Dense output logits, when that Dense is where its activation is: a sharper comparison
    than of probabilities. False when the activation sits elsewhere (an Activation layer) and stays."""
    head = record.get('head') or []
    if not head:
        return True
    last = head[-1]['name']
    for layer in _all_layers(keras_model):
        if layer.name == last and hasattr(layer, 'activation'):
            name = getattr(layer.activation, '__name__', '')
            if name == head[-1]['activation'] and name != 'linear':  # the Dense applies it: made to give logits
                layer.activation = runtime.import_keras().activations.linear if _is_keras3(layer) else \
                    runtime.import_tf_keras().activations.linear
                return True
    return head[-1]['activation'] == 'linear'


def _is_keras3(layer: Any) -> bool:
    return type(layer).__module__.startswith('keras.')


def _all_layers(model: Any) -> Any:
    for layer in getattr(model, 'layers', []):
        yield layer
        yield from _all_layers(layer)


TF_FORMATS = ('tf_checkpoint', 'saved_model')


def tf_keras_model(path: Path, converted: ConvertedKeras) -> Any:
    """Keras 2 loads a TF checkpoint or SavedModel its own way, by the object graph's order, not by name.

    A SavedModel is loaded whole (`load_model`), with its classifier's activation removed to compare logits;
    a checkpoint is loaded into the model it was saved from: the ResNetV2 application, or a nested base +
    global average pooling + Dense. Every object of that model must be matched in the file.
    """
    tf_keras = runtime.import_tf_keras()
    tf_format = find_tf_format(path)
    try:
        if tf_format.kind == 'saved_model':
            model = tf_keras.models.load_model(str(tf_format.directory), compile=False)
            if converted.num_classes:
                model.layers[-1].activation = tf_keras.activations.linear
            return model
        app = getattr(tf_keras.applications, KERAS_RESNETS[converted.arch].keras_app)
        if read_tf_layout(tf_format) == 'nested':
            inputs = tf_keras.Input((None, None, 3))
            features = app(weights=None, include_top=False, input_shape=(None, None, 3))(inputs)
            outputs = tf_keras.layers.Dense(converted.num_classes)(tf_keras.layers.GlobalAveragePooling2D()(features))
            model = tf_keras.Model(inputs, outputs)
        elif converted.num_classes:
            model = app(weights=None, include_top=True, classes=converted.num_classes, classifier_activation=None)
        else:
            model = app(weights=None, include_top=False, pooling='avg', input_shape=(None, None, 3))
        model.load_weights(str(tf_format.prefix)).expect_partial().assert_existing_objects_matched()
        return model
    except (ValueError, AssertionError, OSError, TypeError, KeyError) as e:
        raise ResNetV2ZooError(f'--verify: Keras 2 cannot load {path}: {type(e).__name__}: '
                               f'{str(e).splitlines()[0] if str(e) else ""}') from e


def keras_input(images: torch.Tensor, arch: str) -> np.ndarray:
    """The NHWC batch Keras's `arch` takes for our NCHW `images` (already preprocessed): channels reversed
    (RGB -> BGR) for v1, whose BGR input order the converter folds into the stem conv."""
    array = images.permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(array[..., ::-1]) if KERAS_RESNETS[arch].family == 'v1' else array


def keras_pixels_input(pixels: torch.Tensor, preprocess: str) -> np.ndarray:
    """The NHWC batch the Keras model takes for NCHW RGB `pixels` (0-255): preprocessed as `preprocess` says,
    channels reversed (RGB -> BGR) for 'caffe'."""
    scale, offset, bgr = preprocess_affine(preprocess)
    array = pixels.permute(0, 2, 3, 1).double().numpy()
    if bgr:
        array = array[..., ::-1]
    return np.ascontiguousarray(array * np.asarray(scale) + np.asarray(offset), dtype=np.float32)


def _keras_load_weights(keras_model: Any, path: Path, source_format: str) -> None:
    """Keras picks the reader by file suffix; link the file under the suffix of the format it really is.

    Keras cannot read a TF.js model, and loads a legacy `.h5` by layer order, which for the original v1
    names (`res2a_branch2a`, in another order) is wrong: those are set by layer name instead.
    """
    if source_format == 'tfjs_layers' or source_format.startswith('legacy_h5'):
        weights = read_keras_weights(path)
        if source_format == 'tfjs_layers' or any(is_legacy_layer_name(name) for name in weights.layers):
            set_keras_weights_by_name(keras_model, {canonical_layer_name(k): v for k, v in weights.layers.items()})
            return
    suffix = {'weights_h5': '.weights.h5', 'keras_zip': '.keras'}.get(source_format, '.h5')
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / f'model{suffix}'
        link.symlink_to(path.resolve())
        keras_model.load_weights(str(link))


def set_keras_weights_by_name(keras_model: Any, layers: Dict[str, Dict[str, np.ndarray]]) -> None:
    """Give each Keras layer the variables of the same (keras.applications) name in `layers`."""
    for layer in keras_model.layers:
        if not layer.weights:
            continue
        found = layers.get(layer.name)
        names = [variable.name.split('/')[-1].split(':')[0] for variable in layer.weights]
        if found is None or any(name not in found for name in names):
            raise ResNetV2ZooError(f'--verify: the file has no {layer.name} with variables {names}')
        layer.set_weights([found[name] for name in names])
