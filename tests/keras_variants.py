"""Keras ResNet50V2 models as people build and save them for fine-tuning, with seeded random weights (issue 11).

Each variant departs from keras.applications' defaults in one way a real checkpoint does: BatchNorm eps 1e-3
(Keras's default layer, as the tutorial's hand-built model uses), max pooling, a hidden-Dense or sigmoid head,
the base as a sub-model (two deep, renamed), a Rescaling or Normalization input layer. Each is built once,
by Keras itself, and saved by Keras in every format a user gets: `.keras`, a full-model `.h5` and a
weights-only file; the richest one also by real Keras 2 (`tf_keras`), whose `model_config` is another dialect.

The images are 64x64 so that the last stage's map is 2x2: max and average pooling differ there, and a
Flatten is not a pooling. Random weights are scaled so that outputs stay of order 1-10 (see `randomize_weights`).
"""
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from resnetv2_zoo.keras.runtime import import_keras, import_tf_keras

IMAGE_SIZE = 64
NUM_CLASSES = 4
HIDDEN = 32
RESIDUAL_BRANCH_SCALE = 0.2  # on each block's `3_conv` kernel, as in keras_helpers
UNIT_VARIANCE = (0.5, 1.5)  # BatchNorm moving variances where eps does not matter
SMALL_VARIANCE = (1e-4, 1e-3)  # ... and where it does: 1e-3 vs 1.001e-5 changes each BN's scale by 1.4-3.3x
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# What a Keras model's input is, as a function of raw RGB 0-255 pixels x (NHWC), before any Rescaling or
# Normalization layer inside the model (the converter's `preprocess` option).
PREPROCESS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'tf': lambda x: x / 127.5 - 1.0,  # keras.applications.resnet_v2.preprocess_input
    'torch': lambda x: (x / 255.0 - np.asarray(IMAGENET_DEFAULT_MEAN)) / np.asarray(IMAGENET_DEFAULT_STD),
    'caffe': lambda x: x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR),  # RGB -> BGR, minus the ImageNet mean
    'raw': lambda x: x,  # image_dataset_from_directory's pixels
    'unit': lambda x: x / 255.0,
}


def preprocess(images: np.ndarray, kind: str) -> np.ndarray:
    """`images` (raw RGB 0-255, NHWC) as a Keras model preprocessed with `kind` takes them, float32."""
    return np.ascontiguousarray(PREPROCESS[kind](images.astype(np.float64)).astype(np.float32))


def raw_images(batch_size: int = 2, seed: int = 0) -> np.ndarray:
    """A seeded batch of raw RGB 0-255 pixels, NHWC float32 (whole numbers, as decoded images are)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


# --- building ---

def resnet50v2(keras: Any, include_top: bool = False, pooling: Optional[str] = None, name: str = 'resnet50v2',
               bn_epsilon: Optional[float] = None, **kwargs: Any) -> Any:
    """keras.applications' ResNet50V2 at IMAGE_SIZE, untrained; with every BatchNorm's eps set to `bn_epsilon`
    (rebuilt from its config, as a hand-built model with Keras's default BatchNormalization is)."""
    model = keras.applications.ResNet50V2(weights=None, include_top=include_top, pooling=pooling, name=name,
                                          input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), **kwargs)
    if bn_epsilon is not None:
        config = model.get_config()
        for layer in config['layers']:
            if layer['class_name'] == 'BatchNormalization':
                layer['config']['epsilon'] = bn_epsilon
        model = keras.Model.from_config(config)
    return model


def randomize_weights(model: Any, seed: int, bn_variance: Tuple[float, float] = UNIT_VARIANCE,
                      skip: Set[int] = frozenset()) -> None:
    """Seeded weights that keep activations moderate through the 50 layers and the head, in nested models too.

    As keras_helpers.randomize_weights (He-normal kernels, residual branches scaled down, BatchNorm near
    identity), with each BatchNorm's gamma scaled by sqrt(variance + its eps): the layer's scale is
    U(0.5, 1.5) whatever its variances, so small variances (where eps matters) still give finite outputs.
    The classifier is scaled down so that softmax and sigmoid are not saturated. Layers (and nested models)
    whose `id` is in `skip` keep their weights: a shared base randomized once.
    """
    _randomize(model, np.random.default_rng(seed), bn_variance, skip)


def _randomize(model: Any, rng: np.random.Generator, bn_variance: Tuple[float, float], skip: Set[int]) -> None:
    for layer in model.layers:
        if id(layer) in skip:
            continue
        if hasattr(layer, 'layers'):  # a nested model
            _randomize(layer, rng, bn_variance, skip)
            continue
        values = layer.get_weights()
        if not values:
            continue
        kind = type(layer).__name__
        if kind == 'BatchNormalization':
            size = values[0].shape
            variance = rng.uniform(*bn_variance, size)
            gamma = rng.uniform(0.5, 1.5, size) * np.sqrt(variance + layer.epsilon)
            values = [gamma, rng.uniform(-0.2, 0.2, size), rng.uniform(-0.2, 0.2, size), variance]
        elif kind in ('Conv2D', 'Dense'):
            kernel = values[0]
            fan_in = int(np.prod(kernel.shape[:-1]))
            std = np.sqrt(2.0 / fan_in)
            if layer.name.endswith('_3_conv'):
                std *= RESIDUAL_BRANCH_SCALE
            elif kind == 'Dense' and kernel.shape[-1] != HIDDEN:
                std *= 0.3  # the classifier
            values = [rng.normal(0.0, std, kernel.shape)] + [rng.uniform(-0.1, 0.1, v.shape) for v in values[1:]]
        else:
            raise AssertionError(f'unexpected layer with weights: {layer.name} ({kind})')
        layer.set_weights([v.astype(np.float32) for v in values])


def _input(keras: Any) -> Any:
    return keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))


def _bn_eps_1e3(keras: Any, base: Callable[[str], Any]) -> Any:
    """The tutorial's model: keras.applications' layers with Keras's default BatchNormalization (eps 1e-3), a
    4-class softmax top."""
    return resnet50v2(keras, include_top=True, classes=NUM_CLASSES, bn_epsilon=1e-3)


def _max_features(keras: Any, base: Callable[[str], Any]) -> Any:
    return base('max')  # ResNet50V2(include_top=False, pooling='max') itself


def _max_sequential(keras: Any, base: Callable[[str], Any]) -> Any:
    return keras.Sequential([_input(keras), base('max'), keras.layers.Dropout(0.2), keras.layers.Dense(NUM_CLASSES)])


def _max_predictions(keras: Any, base: Callable[[str], Any]) -> Any:
    """Flat, as keras.applications' top but max-pooled: a Dense named like the official classifier."""
    features = base('max')
    return keras.Model(features.input, keras.layers.Dense(NUM_CLASSES, name='predictions')(features.output))


def _hidden_dense(keras: Any, base: Callable[[str], Any]) -> Any:
    """The common fine-tuning recipe: the base as a sub-model, then GAP, Dense(32, relu), Dropout, Dense."""
    inputs = _input(keras)
    x = base('maps')(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(HIDDEN, activation='relu')(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


def _sigmoid(keras: Any, base: Callable[[str], Any]) -> Any:
    inputs = _input(keras)
    x = keras.layers.GlobalAveragePooling2D()(base('maps')(inputs))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, activation='sigmoid')(x))


def _nested_two_deep(keras: Any, base: Callable[[str], Any]) -> Any:
    """ResNet50V2 inside a Functional `encoder` inside a Sequential."""
    inputs = _input(keras)
    encoder = keras.Model(inputs, base('maps')(inputs), name='encoder')
    return keras.Sequential([_input(keras), encoder, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(NUM_CLASSES)])


def _renamed_base(keras: Any, base: Callable[[str], Any]) -> Any:
    return keras.Sequential([_input(keras), resnet50v2(keras, pooling='avg', name='backbone'),
                             keras.layers.Dense(NUM_CLASSES)])


def _rescaling(keras: Any, base: Callable[[str], Any]) -> Any:
    """Takes raw 0-255 pixels (as image_dataset_from_directory gives them) and rescales them to [0, 1] itself."""
    inputs = _input(keras)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(base('maps')(x))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


def _normalization(keras: Any, base: Callable[[str], Any]) -> Any:
    """Takes raw pixels and normalizes them with the ImageNet mean/std in 0-255 units: torch's preprocessing."""
    inputs = _input(keras)
    mean = [255.0 * m for m in IMAGENET_DEFAULT_MEAN]
    variance = [(255.0 * s) ** 2 for s in IMAGENET_DEFAULT_STD]
    x = keras.layers.Normalization(mean=mean, variance=variance)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(base('maps')(x))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


def _keras2_rich(tf_keras: Any, base: Callable[[str], Any]) -> Any:
    """With real Keras 2: Rescaling, the base inside a Sequential `feature_extractor`, and a hidden-Dense head."""
    inputs = _input(tf_keras)
    x = tf_keras.layers.Rescaling(1 / 255)(inputs)
    resnet = tf_keras.applications.ResNet50V2(weights=None, include_top=False,
                                              input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    x = tf_keras.Sequential([resnet], name='feature_extractor')(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    x = tf_keras.layers.Dense(HIDDEN, activation='relu')(x)
    x = tf_keras.layers.Dropout(0.2)(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(NUM_CLASSES)(x))


# Bases shared by several variants (built and randomized once: each build costs seconds): 'maps' is
# ResNet50V2(include_top=False), 'max' ResNet50V2(include_top=False, pooling='max').
SHARED_BASES: Dict[str, Callable[[Any], Any]] = {
    'maps': lambda keras: resnet50v2(keras),
    'max': lambda keras: resnet50v2(keras, pooling='max'),
}


@dataclass(frozen=True)
class VariantSpec:
    """How to build a variant, and what a user must tell the converter about its weights-only file."""

    build: Callable[[Any, Callable[[str], Any]], Any]  # (the Keras module, a shared base by kind) -> the model
    preprocess: str = 'tf'  # the model's input as a function of raw pixels (a PREPROCESS key)
    output_act: str = 'linear'  # the model's final activation
    weights_options: Dict[str, Any] = field(default_factory=dict)  # KerasOptions for its weights-only file
    bn_variance: Tuple[float, float] = UNIT_VARIANCE
    keras2: bool = False  # built and saved by tf_keras (Keras 2)


FULL_FORMATS = ('keras', 'h5')  # model.save('x.keras'), model.save('x.h5'): the file declares the architecture
WEIGHTS_FORMAT = 'weights_h5'  # Keras 3 save_weights('x.weights.h5'); Keras 2 save_weights('x.h5')
LINEAR = dict(output_act='linear')  # a weights-only file's last Dense is taken as softmax unless told

VARIANTS: Dict[str, VariantSpec] = {
    'bn_eps_1e-3': VariantSpec(_bn_eps_1e3, output_act='softmax', bn_variance=SMALL_VARIANCE,
                               weights_options=dict(bn_eps=1e-3, output_act='softmax')),
    'max_features': VariantSpec(_max_features, weights_options=dict(pooling='max')),
    'max_sequential': VariantSpec(_max_sequential, weights_options=dict(pooling='max', **LINEAR)),
    'max_predictions': VariantSpec(_max_predictions, weights_options=dict(pooling='max', **LINEAR)),
    'hidden_dense': VariantSpec(_hidden_dense, weights_options=dict(hidden_act='relu', **LINEAR)),
    'sigmoid': VariantSpec(_sigmoid, output_act='sigmoid', weights_options=dict(output_act='sigmoid')),
    'nested_two_deep': VariantSpec(_nested_two_deep, weights_options=LINEAR),
    'renamed_base': VariantSpec(_renamed_base, weights_options=LINEAR),
    'rescaling': VariantSpec(_rescaling, preprocess='raw', weights_options=dict(preprocess='unit', **LINEAR)),
    'normalization': VariantSpec(_normalization, preprocess='raw', weights_options=dict(preprocess='torch', **LINEAR)),
    'keras2_rich': VariantSpec(_keras2_rich, preprocess='raw', keras2=True,
                               weights_options=dict(preprocess='unit', hidden_act='relu', **LINEAR)),
}


class KerasVariant:
    """One variant, built and randomized once; its files are saved by Keras on first request (read-only)."""

    def __init__(self, name: str, directory: Path, seed: int, base: Callable[[str], Any],
                 shared_layers: Callable[[], Set[int]]):
        self.name = name
        self.spec = VARIANTS[name]
        self.keras = import_tf_keras() if self.spec.keras2 else import_keras()
        self.model = self.spec.build(self.keras, base)
        randomize_weights(self.model, seed, self.spec.bn_variance, skip=shared_layers())
        self.directory = Path(directory)
        self._files: Dict[str, Path] = {}
        self._outputs: Dict[Tuple[bytes, str], np.ndarray] = {}

    @property
    def preprocess(self) -> str:
        return self.spec.preprocess

    @property
    def output_act(self) -> str:
        return self.spec.output_act

    @property
    def weights_options(self) -> Dict[str, Any]:
        return dict(self.spec.weights_options)

    def file(self, file_format: str) -> Path:
        """The model saved by Keras as `file_format`: 'keras', 'h5' (full model) or 'weights_h5'."""
        if file_format not in self._files:
            self.directory.mkdir(parents=True, exist_ok=True)
            if file_format == 'keras':
                path = self.directory / f'{self.name}.keras'
                self.model.save(path)
            elif file_format == 'h5':
                path = self.directory / f'{self.name}.h5'
                self.model.save(path)
            elif file_format == WEIGHTS_FORMAT:
                # Keras 2's ModelCheckpoint(save_weights_only=True) writes a plain .h5
                path = self.directory / (f'{self.name}_weights.h5' if self.spec.keras2 else f'{self.name}.weights.h5')
                self.model.save_weights(path)
            else:
                raise ValueError(f'unknown format {file_format!r}')
            self._files[file_format] = path
        return self._files[file_format]

    def outputs(self, images: np.ndarray, preprocess_as: Optional[str] = None) -> np.ndarray:
        """Keras's output on raw RGB pixels `images` (NHWC), preprocessed as the model expects (or as
        `preprocess_as`, to ask what a model fed another way would give)."""
        kind = preprocess_as or self.preprocess
        key = (images.tobytes(), kind)
        if key not in self._outputs:
            self._outputs[key] = np.asarray(self.model(preprocess(images, kind), training=False))
        return self._outputs[key]


class KerasVariants:
    """All variants, each built on first use and then shared (a session or module fixture holds one).

    Variants that call a base of the same kind share one instance (SHARED_BASES), randomized once; their
    heads are randomized each with its own seed.
    """

    def __init__(self, directory: Path, seed: int = 11):
        self.directory = Path(directory)
        self.seed = seed
        self._built: Dict[str, KerasVariant] = {}
        self._bases: Dict[str, Any] = {}

    def __getitem__(self, name: str) -> KerasVariant:
        if name not in self._built:
            seed = self.seed + list(VARIANTS).index(name)
            self._built[name] = KerasVariant(name, self.directory / name, seed, self.base, self._shared_layers)
        return self._built[name]

    def base(self, kind: str) -> Any:
        if kind not in self._bases:
            model = SHARED_BASES[kind](import_keras())
            randomize_weights(model, self.seed + 100 + list(SHARED_BASES).index(kind))
            self._bases[kind] = model
        return self._bases[kind]

    def _shared_layers(self) -> Set[int]:
        return {id(layer) for base in self._bases.values() for layer in (base, *base.layers)}


# --- models and files the converter must refuse ---

def refused_models(keras: Any) -> Dict[str, Any]:
    """Models whose head or inputs cannot be a timm ResNetV2 exactly, sharing one (untrained) base.

    Keys name what is wrong: a Conv2D or a BatchNormalization in the head, a Flatten of the 2x2 map,
    two inputs.
    """
    base = resnet50v2(keras)
    layers = keras.layers

    def head(*head_layers: Any, pooled: bool = True) -> Any:
        inputs = _input(keras)
        x = base(inputs)
        for layer in head_layers:
            x = layer(x)
        if pooled:
            x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, layers.Dense(NUM_CLASSES)(x))

    image, extra = _input(keras), keras.Input((NUM_CLASSES,), name='extra_input')
    logits = layers.Dense(NUM_CLASSES)(layers.GlobalAveragePooling2D()(base(image)))
    return {
        'conv_head': head(layers.Conv2D(8, 1, name='head_conv')),
        'bn_head': head(layers.BatchNormalization(name='head_bn')),
        'flatten_2x2': head(layers.Flatten(name='flatten'), pooled=False),
        'two_inputs': keras.Model([image, extra], layers.Add()([logits, extra])),
    }


def iter_layer_configs(config: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Every layer's entry in a model config (`{'class_name', 'config': {'layers': [...]}}`), nested ones too."""
    for layer in config.get('config', {}).get('layers', []):
        yield layer
        yield from iter_layer_configs(layer)


def edit_keras_config(src: Path, dst: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    """A copy of the `.keras` archive `src` whose config.json is changed in place by `edit`."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, 'w') as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename == 'config.json':
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            new.writestr(info, data)
    return dst
