"""Parity with real Keras: every file format Keras writes converts to a timm model with the same outputs.

ResNet50V2 (conftest's session model, seeded random weights, BN statistics included) is converted from
every source: each file format Keras writes, with and without the top, and the live model. The converter
tests prove that all sources give bit-identical weights, so sources and input sizes are independent:
the `.weights.h5` Keras 3 writes runs at every size, the other sources at one odd size, and the deeper
101V2 and 152V2, whose mapping differs only in block counts, from that one source with the top. Keras computes the
reference once per input size; every conversion must match it within the project tolerance. The last
tests prove the comparison can fail: two same-shaped convs swapped break it.
"""
from typing import Callable, Dict, NamedTuple, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from keras_helpers import FILE_FORMATS, KerasResNet, build_keras_resnetv2

from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.weights.convert import build_model, convert_keras
from resnetv2_zoo.weights.verify import parity_tolerance

pytestmark = pytest.mark.keras

# 224 and two odd sizes for 50V2; the deeper models at smaller odd sizes to keep the suite fast.
IMAGE_SIZES = {
    'resnet50v2_keras': (224, 97, 225),
    'resnet101v2_keras': (97, 65),
    'resnet152v2_keras': (97, 65),
}
BATCH_SIZE = 2
SOURCES = (*FILE_FORMATS, 'live_model')
FULL_SOURCE = 'weights_h5'  # at every size, and the one source of the deeper models
# (arch, source): every source for 50V2, one for each deeper model (building a 152V2 in Keras alone takes seconds)
CASES = [pytest.param('resnet50v2_keras', source, id=f'resnet50v2_keras-{source}') for source in SOURCES] + [
    pytest.param(arch, FULL_SOURCE, id=f'{arch}-{FULL_SOURCE}', marks=pytest.mark.slow)
    for arch in ('resnet101v2_keras', 'resnet152v2_keras')]


def _sizes(case: 'KerasCase', source: str) -> Tuple[int, ...]:
    """Every size for FULL_SOURCE; the first odd one (97) for the other sources."""
    sizes = IMAGE_SIZES[case.keras.arch]
    return sizes if source == FULL_SOURCE else tuple(size for size in sizes if size % 2)[:1]


class KerasCase(NamedTuple):
    keras: KerasResNet
    images: Dict[int, np.ndarray]  # size -> NCHW batch in [-1, 1]
    reference: Dict[Tuple[int, str], np.ndarray]  # (size, 'logits' | 'avg' | 'max') -> Keras output


def _images(size: int) -> np.ndarray:
    return np.random.default_rng(size).uniform(-1, 1, (BATCH_SIZE, 3, size, size)).astype(np.float32)


def _keras_case(keras: KerasResNet) -> KerasCase:
    images = {size: _images(size) for size in IMAGE_SIZES[keras.arch]}
    reference = {}
    for size, batch in images.items():
        for name, output in keras.outputs(batch).items():
            reference[size, name] = output
        if size == 224:  # where the genuine top model runs too, it must give the same logits
            np.testing.assert_allclose(np.asarray(keras.top(batch.transpose(0, 2, 3, 1), training=False)),
                                       reference[size, 'logits'], rtol=0, atol=1e-4)
    return KerasCase(keras, images, reference)


@pytest.fixture(scope='module')
def keras_cases(keras_resnet50v2, tmp_path_factory) -> Callable[[str], KerasCase]:
    """Built lazily, one depth at a time, and kept for the module; ResNet50V2 is the session's."""
    cache: Dict[str, KerasCase] = {}

    def get(arch: str) -> KerasCase:
        if arch not in cache:
            keras = keras_resnet50v2 if arch == keras_resnet50v2.arch else KerasResNet(
                arch, tmp_path_factory.mktemp(arch), seed=1)
            cache[arch] = _keras_case(keras)
        return cache[arch]

    return get


def _assert_close(ours: torch.Tensor, keras_out: np.ndarray, what: str) -> float:
    keras_max = float(np.abs(keras_out).max())
    diff = float(np.abs(ours.numpy() - keras_out).max())
    tolerance = parity_tolerance(keras_out)
    assert ours.shape == keras_out.shape, what
    assert diff <= tolerance, f'{what}: max |keras - ours| = {diff:.3g} > {tolerance:.3g} (max |keras| {keras_max:.3g})'
    assert 1.0 <= keras_max <= 1e3, f'{what}: Keras outputs of size {keras_max:.3g} make the tolerance meaningless'
    return diff


def _convert(case: KerasCase, include_top: bool, source: str):
    keras = case.keras
    return convert_keras(keras.model(include_top) if source == 'live_model' else keras.file(include_top, source))


@pytest.mark.parametrize('arch, source', CASES)
def test_logits_match_keras(keras_cases, arch, source):
    case = keras_cases(arch)
    converted = _convert(case, True, source)
    assert (converted.arch, converted.num_classes) == (arch, 1000)
    assert converted.metadata['source_format'] == source
    model = build_model(converted)
    with torch.no_grad():
        for size in _sizes(case, source):
            ours = model(torch.from_numpy(case.images[size]))
            _assert_close(ours, case.reference[size, 'logits'], f'{arch} {source} logits {size}')


# Without the top, 50V2 only: the deeper models' logits above run the same pooled features through their head, and
# the no-top files differ from the top ones by the same missing layer at every depth.
@pytest.mark.parametrize('arch, source', [case for case in CASES if case.values[0] == 'resnet50v2_keras'])
def test_pooled_features_match_keras_without_top(keras_cases, arch, source):
    case = keras_cases(arch)
    converted = _convert(case, False, source)
    assert (converted.arch, converted.num_classes) == (arch, 0)
    model = build_model(converted)
    with torch.no_grad():
        for size in _sizes(case, source):
            features = model.forward_features(torch.from_numpy(case.images[size]))  # model() is head(features)
            for pool in ('avg', 'max'):
                model.reset_classifier(0, global_pool=pool)
                ours = model.forward_head(features)
                _assert_close(ours, case.reference[size, pool], f'{arch} {source} {pool} {size}')


@pytest.mark.slow
def test_tutorial_four_class_head(tmp_path):
    """A no-top ResNet50V2 with Dense(4, name='predictions'), saved by ModelCheckpoint(save_weights_only=True)."""
    keras = import_keras()
    base = build_keras_resnetv2('resnet50v2_keras', include_top=False, seed=3)
    head = keras.layers.Dense(4, name='predictions')
    model = keras.Model(base.input, head(base.output))
    head.set_weights([np.random.default_rng(4).normal(0, 0.05, (2048, 4)).astype(np.float32), np.ones(4, np.float32)])
    images = np.random.default_rng(5).uniform(-1, 1, (2, 160, 160, 3)).astype(np.float32)
    model.compile(optimizer='sgd', loss='mse', run_eagerly=True)  # one step: no traced (or XLA) graph to build
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / 'birds.weights.h5'), save_weights_only=True)
    model.fit(images, np.zeros((2, 4), np.float32), epochs=1, verbose=0, callbacks=[checkpoint])
    model.save_weights(tmp_path / 'final.weights.h5')
    keras_logits = np.asarray(model(images, training=False))
    for path in (tmp_path / 'birds.weights.h5', tmp_path / 'final.weights.h5'):
        converted = convert_keras(path)
        assert (converted.arch, converted.num_classes) == ('resnet50v2_keras', 4)
        with torch.no_grad():
            ours = build_model(converted)(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        _assert_close(ours, keras_logits, path.name)


@pytest.mark.parametrize('pitfall', ['swap_conv2_block1_0_and_3_conv', 'nn_maxpool_stem'])
def test_parity_check_catches_mapping_pitfalls(keras_cases, pitfall):
    """The suite can fail: a swap of two same-shaped convs, or -inf padding in the stem pool, breaks parity."""
    case = keras_cases('resnet50v2_keras')
    converted = convert_keras(case.keras.file(True, 'weights_h5'))
    if pitfall == 'swap_conv2_block1_0_and_3_conv':
        sd = converted.state_dict
        for name in ('weight', 'bias'):
            a, b = f'stages.0.blocks.0.downsample.{name}', f'stages.0.blocks.0.conv3.{name}'
            assert sd[a].shape == sd[b].shape
            sd[a], sd[b] = sd[b], sd[a]
    model = build_model(converted)
    if pitfall == 'nn_maxpool_stem':
        model.stem.pool = nn.MaxPool2d(3, stride=2, padding=1)
    with torch.no_grad():
        ours = model(torch.from_numpy(case.images[97]))
    with pytest.raises(AssertionError, match='max \\|keras - ours\\|'):
        _assert_close(ours, case.reference[97, 'logits'], pitfall)
