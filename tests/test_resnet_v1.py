"""Keras's ResNet50/101/152 (v1) as timm models: the model API, and parity with real Keras in every file layout.

Keras models with seeded random weights (BN statistics included) are saved by Keras in each format it
writes, and in the two it cannot (TF.js, and Keras 2 `.h5` under the original 2017 layer names); every
conversion must give Keras's outputs within the project tolerance, with Keras fed the BGR image that
'caffe' preprocessing gives it. Controls show the comparison can fail: the BGR swap left out, or the
stride moved onto the 3x3 conv as timm's ResNet has it.
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from cli_helpers import CliResult, run_cli
from keras_helpers import FILE_FORMATS, copy_weights_by_name, randomize_weights, save_keras, strip_weights_h5_names
from timm.models import group_parameters
from v1_helpers import keras_model_layers, to_legacy_names, write_keras2_h5, write_tfjs

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.errors import KerasFileError, ResNetV2ZooError
from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.keras.spec import KERAS_RESNETS, canonical_layer_name, legacy_layer_name
from resnetv2_zoo.models.resnet_keras import KERAS_CAFFE_MEAN, KERAS_CAFFE_STD
from resnetv2_zoo.weights.convert import build_model, convert_keras, convert_to_dir
from resnetv2_zoo.weights.verify import keras_input, keras_reference_model, parity_tolerance, verify_against_keras

MODELS = ['resnet50_keras', 'resnet101_keras', 'resnet152_keras']
# keras.applications.ResNet*(...).count_params(), BN moving mean and variance included (keras.io's table).
KERAS_PARAM_COUNTS = {
    ('resnet50_keras', True): 25_636_712,
    ('resnet50_keras', False): 23_587_712,
    ('resnet101_keras', True): 44_707_176,
    ('resnet152_keras', True): 60_419_944,
}
FEATURE_CHANNELS = [64, 256, 512, 1024, 2048]
FEATURE_REDUCTIONS = [2, 4, 8, 16, 32]
BATCH = 2


def _keras_param_count(model: nn.Module) -> int:
    params = sum(p.numel() for p in model.parameters())
    return params + sum(b.numel() for n, b in model.named_buffers() if n.endswith(('running_mean', 'running_var')))


def _images(size: int, seed: int = 0) -> torch.Tensor:
    """Inputs on the scale the model sees after caffe preprocessing (0-255 minus the mean)."""
    return torch.from_numpy(np.random.default_rng(seed).uniform(-120, 130, (BATCH, 3, size, size)).astype(np.float32))


# --- model API ---

def test_registered_with_timm():
    assert set(MODELS) <= set(timm.list_models('*_keras'))
    assert all(timm.models.get_pretrained_cfg(f'{m}.tf_in1k') is not None for m in MODELS)
    assert {KERAS_RESNETS[m].family for m in MODELS} == {'v1'}


@pytest.mark.parametrize('name, top', KERAS_PARAM_COUNTS.keys())
def test_param_count_equals_keras(name, top):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=1000 if top else 0)
    assert _keras_param_count(model) == KERAS_PARAM_COUNTS[name, top]


def test_keras_layout_stride_on_first_1x1_and_biases():
    """Keras `residual_block_v1`: the stride is on `_1_conv` (and `_0_conv`), every conv is biased."""
    model = timm.create_model('resnet50_keras')
    for stage, stride in zip(model.stages, (1, 2, 2, 2)):
        first = stage.blocks[0]
        assert first.conv1.stride == (stride, stride) and first.downsample.conv.stride == (stride, stride)
        assert first.conv2.stride == (1, 1)
        assert all(b.downsample is None for b in stage.blocks[1:])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(c.bias is not None for c in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 53 and all(n.eps == 1.001e-5 for n in norms)


def test_pretrained_cfg_is_keras_caffe_preprocessing():
    """timm's own transforms give Keras's caffe input (x - mean, 0-255 scale) in RGB order."""
    model = timm.create_model('resnet50_keras')
    cfg = model.pretrained_cfg
    assert cfg['mean'] == KERAS_CAFFE_MEAN and cfg['std'] == KERAS_CAFFE_STD
    assert cfg['first_conv'] == 'stem.conv' and cfg['classifier'] == 'head.fc' and cfg['num_classes'] == 1000
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    from PIL import Image
    pixel = (200, 100, 50)
    x = transform(Image.new('RGB', (256, 256), pixel))
    expected = torch.tensor(pixel, dtype=torch.float32) - torch.tensor([123.68, 116.779, 103.939])
    torch.testing.assert_close(x[:, 100, 100], expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == FEATURE_CHANNELS
    assert model.feature_info.reduction() == FEATURE_REDUCTIONS
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    for f, c, r in zip(feats, FEATURE_CHANNELS, FEATURE_REDUCTIONS):
        assert f.shape == (1, c, 64 // r, 64 // r)


def test_features_getter_and_fx_agree():
    def create(**kwargs):
        torch.manual_seed(0)
        return timm.create_model('resnet50_keras', **kwargs).eval()

    full = create()
    getter = create(features_only=True, out_indices=(0, 2, 4))
    fx = create(features_only=True, out_indices=(0, 2, 4), feature_cls='fx')
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b, expected_last = getter(x), fx(x), full.forward_features(x)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb)
    torch.testing.assert_close(a[-1], expected_last)
    assert (a[0] >= 0).all()  # the stride-2 tap is after the stem's ReLU (Keras `conv1_relu`)


def test_forward_intermediates_stop_early_and_prune():
    model = timm.create_model('resnet50_keras').eval()
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        out, inters = model.forward_intermediates(x)
        torch.testing.assert_close(out, model.forward_features(x))
        torch.testing.assert_close(inters[-1], out)
        assert [t.shape[1] for t in inters] == FEATURE_CHANNELS
        assert [t.shape[-1] for t in inters] == [math.ceil(97 / r) for r in FEATURE_REDUCTIONS]
        last, early = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        torch.testing.assert_close(last, inters[2])
        torch.testing.assert_close(early[1], inters[2])
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(model.stages) == 2 and model.num_features == 512
        torch.testing.assert_close(model.forward_features(x), inters[2])


def test_grad_checkpointing_and_group_matcher():
    model = timm.create_model('resnet50_keras', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    model.set_grad_checkpointing()
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())


def test_reset_classifier():
    model = timm.create_model('resnet50_keras')
    model.reset_classifier(7, 'max')
    assert model.get_classifier().out_features == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, 'nope')


EXPORTERS = {
    'torchscript': torch.jit.script,
    'fx': torch.fx.symbolic_trace,
    'compile_fullgraph': lambda model: torch.compile(model, backend='aot_eager', fullgraph=True),
}


@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.slow
def test_exported_model_matches_eager(exporter):
    model = timm.create_model('resnet50_keras', num_classes=10).eval()
    exported = EXPORTERS[exporter](model)
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_name_table_both_spellings():
    blocks50, blocks101 = KERAS_RESNETS['resnet50_keras'].block_counts, KERAS_RESNETS['resnet101_keras'].block_counts
    cases = {'conv1': 'conv1_conv', 'bn_conv1': 'conv1_bn', 'fc1000': 'predictions',
             'res2a_branch2a': 'conv2_block1_1_conv', 'bn2a_branch2b': 'conv2_block1_2_bn',
             'res2a_branch1': 'conv2_block1_0_conv', 'bn5c_branch2c': 'conv5_block3_3_bn',
             'res4f_branch2c': 'conv4_block6_3_conv', 'res4b22_branch2a': 'conv4_block23_1_conv'}
    for old, new in cases.items():
        assert canonical_layer_name(old) == new
    assert legacy_layer_name('conv4_block6_3_conv', blocks50) == 'res4f_branch2c'
    assert legacy_layer_name('conv4_block23_1_conv', blocks101) == 'res4b22_branch2a'
    assert canonical_layer_name('conv2_block1_1_conv') == 'conv2_block1_1_conv'


# --- parity with Keras ---

class KerasCase(NamedTuple):
    arch: str
    top: Any  # live Keras model with the top (logits)
    layers: Dict[str, Dict[str, np.ndarray]]
    files: Dict[str, Path]  # source kind -> file or folder
    reference: Dict[int, np.ndarray]  # image size -> Keras logits


V1_SIZES = {'resnet50_keras': (224, 97), 'resnet101_keras': (65,), 'resnet152_keras': (65,)}


def _keras_case(arch: str, directory: Path, all_formats: bool) -> KerasCase:
    top = keras_reference_model(arch, 1000)
    randomize_weights(top, seed=3)
    notop = keras_reference_model(arch, 0)
    copy_weights_by_name(top, notop)
    layers = keras_model_layers(top)
    block_counts = KERAS_RESNETS[arch].block_counts
    files = {'legacy_names_h5': write_keras2_h5(to_legacy_names(layers, block_counts), directory / 'old.h5'),
             'tfjs_legacy_names': write_tfjs(to_legacy_names(layers, block_counts), directory / 'tfjs_old')}
    if all_formats:
        for file_format in FILE_FORMATS:
            files[file_format] = save_keras(top, directory, file_format)
        files['weights_h5_unnamed'] = strip_weights_h5_names(files['weights_h5'], directory / 'unnamed.weights.h5')
        files['tfjs'] = write_tfjs(layers, directory / 'tfjs', shard_bytes=1 << 20)
    logits_model = import_keras().Model(notop.input, top.get_layer('predictions')(notop.output))
    reference = {size: np.asarray(logits_model(keras_input(_images(size), arch), training=False))
                 for size in V1_SIZES[arch]}
    return KerasCase(arch, top, layers, files, reference)


@pytest.fixture(scope='module')
def keras_cases(tmp_path_factory) -> Callable[[str], KerasCase]:
    cache: Dict[str, KerasCase] = {}

    def get(arch: str) -> KerasCase:
        if arch not in cache:
            cache[arch] = _keras_case(arch, tmp_path_factory.mktemp(arch), all_formats=arch == 'resnet50_keras')
        return cache[arch]
    return get


def _assert_parity(model: nn.Module, case: KerasCase, sizes: Optional[Tuple[int, ...]] = None) -> None:
    """Keras's logits at each of `sizes` (default: every size the case has a reference for)."""
    for size, reference in case.reference.items():
        if sizes is not None and size not in sizes:
            continue
        with torch.no_grad():
            ours = model(_images(size)).numpy()
        diff = float(np.abs(ours - reference).max())
        assert diff <= parity_tolerance(reference), (case.arch, size, diff, float(np.abs(reference).max()))


SOURCES_50 = ('live_model', *FILE_FORMATS, 'weights_h5_unnamed', 'legacy_names_h5', 'tfjs', 'tfjs_legacy_names')
# Every source reads the same weights, and the input size changes only the model's geometry (padding, pooling),
# not which weights are read: one source (the official file's format) at every size, the others at the odd 97.
FULL_SOURCE_50 = 'legacy_h5_weights'


@pytest.mark.keras
@pytest.mark.parametrize('source', SOURCES_50)
def test_resnet50_parity_every_format(keras_cases, source):
    case = keras_cases('resnet50_keras')
    converted = convert_keras(case.top if source == 'live_model' else case.files[source])
    assert converted.arch == 'resnet50_keras' and converted.num_classes == 1000
    _assert_parity(build_model(converted), case, sizes=None if source == FULL_SOURCE_50 else (97,))


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet101_keras', 'resnet152_keras'])
def test_deep_parity(keras_cases, arch):
    """The deeper models from the original-names file (Caffe's `res4b22` spelling) and from TF.js."""
    case = keras_cases(arch)
    for source in ('legacy_names_h5', 'tfjs_legacy_names'):
        converted = convert_keras(case.files[source])
        assert converted.arch == arch
        _assert_parity(build_model(converted), case)


@pytest.mark.keras
def test_controls_fail(keras_cases):
    """The parity check can fail: without the BGR fold, or with the stride on the 3x3 conv (timm's layout)."""
    case = keras_cases('resnet50_keras')
    converted = convert_keras(case.files['legacy_h5_weights'])
    reference = case.reference[97]
    tolerance = parity_tolerance(reference)

    unswapped = build_model(converted)
    with torch.no_grad():
        unswapped.stem.conv.weight.copy_(unswapped.stem.conv.weight.flip(1))
        assert float(np.abs(unswapped(_images(97)).numpy() - reference).max()) > 100 * tolerance

    restrided = build_model(converted)
    for stage in restrided.stages[1:]:
        stage.blocks[0].conv1.stride, stage.blocks[0].conv2.stride = (1, 1), (2, 2)
    with torch.no_grad():
        assert float(np.abs(restrided(_images(97)).numpy() - reference).max()) > 100 * tolerance


@pytest.mark.keras
def test_verify_v1_and_tfjs(keras_cases):
    """`convert --verify` feeds Keras BGR for v1, and sets TF.js / original-name weights by layer name."""
    case = keras_cases('resnet50_keras')
    for source in ('legacy_h5_weights', 'tfjs_legacy_names', 'legacy_names_h5'):
        result = verify_against_keras(case.files[source], convert_keras(case.files[source]))
        assert result.passed, (source, result.summary())


@pytest.mark.keras
def test_pretrained_true_finds_official_v1_file(keras_cases, tmp_path, monkeypatch):
    """`pretrained=True` converts `resnet50_weights_tf_dim_ordering_tf_kernels.h5` from the Keras cache."""
    case = keras_cases('resnet50_keras')
    keras_home = tmp_path / 'keras'
    (keras_home / 'models').mkdir(parents=True)
    official = keras_home / 'models' / 'resnet50_weights_tf_dim_ordering_tf_kernels.h5'
    assert KERAS_RESNETS['resnet50_keras'].weights_file_name() == official.name
    official.write_bytes(case.files['legacy_h5_weights'].read_bytes())
    from resnetv2_zoo.keras.files import file_hexdigest
    md5 = file_hexdigest(official, 'md5')
    monkeypatch.setitem(KERAS_RESNETS, 'resnet50_keras',
                        dataclasses.replace(KERAS_RESNETS['resnet50_keras'], weights_md5=(md5, md5)))
    monkeypatch.setenv('KERAS_HOME', str(keras_home))
    monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
    model = timm.create_model('resnet50_keras', pretrained=True).eval()
    _assert_parity(model, case)
    assert (tmp_path / 'cache' / 'resnet50_keras.tf_in1k' / 'model.safetensors').is_file()


# --- bad input: one line, nothing written ---



def _assert_refused(result: CliResult, out: Path, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not out.exists() and not any(p.name.startswith(out.name) for p in out.parent.iterdir())


@pytest.fixture(scope='module')
def v1_state_files(tmp_path_factory):
    """A random resnet50_keras written as an original-names .h5 and a TF.js folder, without Keras."""
    directory = tmp_path_factory.mktemp('v1files')
    torch.manual_seed(0)
    state = timm.create_model('resnet50_keras').state_dict()
    layers = _state_dict_to_keras_layers(state)
    blocks = KERAS_RESNETS['resnet50_keras'].block_counts
    return dict(state=state, layers=layers,
                h5=write_keras2_h5(to_legacy_names(layers, blocks), directory / 'old.h5'),
                tfjs=write_tfjs(to_legacy_names(layers, blocks), directory / 'tfjs', shard_bytes=8 << 20))


def _state_dict_to_keras_layers(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, np.ndarray]]:
    from resnetv2_zoo.keras.spec import iter_tensor_names, keras_layer_names
    from resnetv2_zoo.weights.convert import bgr_to_rgb_stem

    layers = {}
    for layer in keras_layer_names(KERAS_RESNETS['resnet50_keras'].block_counts, True, family='v1'):
        layers[layer] = {}
        for var, key in iter_tensor_names(layer, 'v1'):
            value = state[key]
            if key == 'stem.conv.weight':
                value = bgr_to_rgb_stem(value)
            value = value.numpy()
            layers[layer][var] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T if value.ndim == 2 \
                else value
    return layers


def test_state_dict_round_trip_bit_exact(v1_state_files):
    """Original-names .h5 and TF.js both give back exactly the tensors they were written from."""
    for source in ('h5', 'tfjs'):
        converted = convert_keras(v1_state_files[source])
        assert converted.arch == 'resnet50_keras'
        for key, value in v1_state_files['state'].items():
            assert torch.equal(converted.state_dict[key], value), (source, key)


@pytest.mark.slow
def test_family_mismatch_refused_naming_both(v1_state_files, tmp_path, capsys):
    out = tmp_path / 'out'
    result = run_cli(capsys, 'convert', str(v1_state_files['h5']), '-o', str(out), '--arch', 'resnet50v2_keras')
    _assert_refused(result, out, 'resnet50_keras', 'resnet50v2_keras', 'ResNet (v1)')

    from keras_helpers import write_legacy_h5
    torch.manual_seed(0)
    v2_file = write_legacy_h5(timm.create_model('resnet50v2_keras').state_dict(), 'resnet50v2_keras',
                              tmp_path / 'v2.h5')
    result = run_cli(capsys, 'convert', str(v2_file), '-o', str(out), '--arch', 'resnet50_keras')
    _assert_refused(result, out, 'resnet50v2_keras', 'resnet50_keras', 'ResNetV2')


@pytest.mark.slow
def test_old_names_file_missing_a_layer_lists_it(v1_state_files, tmp_path, capsys):
    blocks = KERAS_RESNETS['resnet50_keras'].block_counts
    layers = to_legacy_names(v1_state_files['layers'], blocks)
    del layers['res3b_branch2a'], layers['bn4f_branch2c']
    damaged = write_keras2_h5(layers, tmp_path / 'damaged.h5')
    with pytest.raises(KerasFileError, match=r'missing layers: .*res3b_branch2a.*bn4f_branch2c'):
        convert_keras(damaged)
    out = tmp_path / 'out'
    result = run_cli(capsys, 'convert', str(damaged), '-o', str(out))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'res3b_branch2a' in result.stderr and 'bn4f_branch2c' in result.stderr
    assert not out.exists()


def _copy_tfjs(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.slow
@pytest.mark.parametrize('damage, needle', [
    ('missing_shard', 'shard group1-shard2of'),
    ('truncated_shard', 'shard group1-shard2of'),
    ('truncated_last_shard', 'truncated'),
    ('float16', "dtype 'float16'"),
    ('quantized', 'quantized to uint8'),
    ('outside_path', 'outside the model folder'),
])
def test_tfjs_bad_input(v1_state_files, tmp_path, damage, needle, capsys):
    folder = _copy_tfjs(v1_state_files['tfjs'], tmp_path / 'tfjs')
    manifest = json.loads((folder / 'model.json').read_text())
    shards = manifest['weightsManifest'][0]['paths']
    assert len(shards) >= 3
    if damage == 'missing_shard':
        (folder / shards[1]).unlink()
    elif damage == 'truncated_shard':
        data = (folder / shards[1]).read_bytes()
        (folder / shards[1]).write_bytes(data[:-100])
    elif damage == 'truncated_last_shard':
        data = (folder / shards[-1]).read_bytes()
        (folder / shards[-1]).write_bytes(data[:-4])
    else:
        if damage == 'float16':
            manifest['weightsManifest'][0]['weights'][5]['dtype'] = 'float16'
        elif damage == 'quantized':
            manifest['weightsManifest'][0]['weights'][5]['quantization'] = dict(dtype='uint8', min=-1.0, scale=0.01)
        else:
            manifest['weightsManifest'][0]['paths'][0] = '../elsewhere.bin'
        (folder / 'model.json').write_text(json.dumps(manifest))
    with pytest.raises(KerasFileError, match=needle):
        convert_keras(folder)
    out = tmp_path / 'out'
    _assert_refused(run_cli(capsys, 'convert', str(folder), '-o', str(out)), out, needle)


def test_tfjs_accepts_model_json_path(v1_state_files, tmp_path):
    converted = convert_keras(v1_state_files['tfjs'] / 'model.json')
    assert converted.metadata['source_format'] == 'tfjs_layers'
    out = convert_to_dir(v1_state_files['tfjs'], tmp_path / 'out')
    loaded = timm.create_model('resnet50_keras', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    for key, value in v1_state_files['state'].items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_arch_still_refused():
    with pytest.raises(ResNetV2ZooError, match='unknown arch'):
        convert_keras('x.h5', arch='resnet18_keras')
