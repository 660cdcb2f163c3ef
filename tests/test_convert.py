"""The converter on Keras-written files: every format gives the same weights, bad inputs are refused with
a specific message and leave nothing behind, and the outputs load back through timm and the package."""
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Dict

import h5py
import numpy as np
import pytest
import safetensors
import timm
import torch
from keras_helpers import FILE_FORMATS, save_keras, strip_weights_h5_names

import resnetv2_zoo
from resnetv2_zoo import cli
from resnetv2_zoo.errors import KerasFileError, ResNetV2ZooError
from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.weights.checkpoint import load_model
from resnetv2_zoo.weights.convert import ConvertedKeras, build_model, convert_keras, convert_to_dir, convert_to_file

ARCH = 'resnet50v2_keras'
NUM_CLASSES = 1000
LABELS = [f'class_{i}' for i in range(NUM_CLASSES)]


@pytest.fixture(scope='module')
def keras_model(keras_resnet50v2):
    """The session's Keras ResNet50V2 (conftest), with its top; read-only."""
    return keras_resnet50v2.top


@pytest.fixture(scope='module')
def keras_files(keras_resnet50v2) -> Dict[str, Path]:
    """It saved by Keras in each format, plus the name-less files older Keras 3 wrote; read-only."""
    return {fmt: keras_resnet50v2.file(True, fmt) for fmt in (*FILE_FORMATS, 'weights_h5_unnamed', 'keras_zip_unnamed')}


@pytest.fixture(scope='module')
def reference(keras_files) -> ConvertedKeras:
    return convert_keras(keras_files['weights_h5'])


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty directory for outputs; tests check that a refused conversion leaves it empty."""
    out = tmp_path / 'out'
    out.mkdir()
    return out


def _assert_same_weights(converted: ConvertedKeras, reference: ConvertedKeras) -> None:
    assert (converted.arch, converted.num_classes) == (reference.arch, reference.num_classes)
    assert converted.state_dict.keys() == reference.state_dict.keys()
    for key, value in reference.state_dict.items():
        assert converted.state_dict[key].dtype == value.dtype, key
        assert torch.equal(converted.state_dict[key], value), key


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _refused(source, workdir: Path, *fragments: str, arch: str = 'auto') -> str:
    """Convert `source` into `workdir`, expect a KerasFileError naming all `fragments`, and nothing written."""
    with pytest.raises(KerasFileError) as info:
        convert_to_dir(source, workdir / 'model', arch=arch)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert list(workdir.iterdir()) == []
    return message


# --- every format, the same weights ---

@pytest.mark.keras
@pytest.mark.parametrize('file_format', [*FILE_FORMATS, 'weights_h5_unnamed', 'keras_zip_unnamed'])
def test_every_format_gives_the_same_weights(keras_files, reference, file_format):
    converted = convert_keras(keras_files[file_format])
    _assert_same_weights(converted, reference)
    path = keras_files[file_format]
    assert converted.metadata['source_file'] == path.name
    assert converted.metadata['converter_version'] == resnetv2_zoo.__version__
    assert converted.metadata['source_format'] == file_format.replace('_unnamed', '')
    expected_version = 'unknown' if file_format.startswith('weights_h5') else import_keras().__version__
    assert converted.metadata['keras_version'] == expected_version


@pytest.mark.keras
def test_live_model_and_weights_match_keras_variables(keras_model, reference):
    converted = convert_keras(keras_model)
    _assert_same_weights(converted, reference)
    assert converted.metadata['source_format'] == 'live_model'
    # name by name, not by order: the projection shortcut and the last conv of conv2_block1 have one shape
    for layer, module in (('conv2_block1_0_conv', 'downsample'), ('conv2_block1_3_conv', 'conv3')):
        kernel = keras_model.get_layer(layer).get_weights()[0]
        ours = converted.state_dict[f'stages.0.blocks.0.{module}.weight']
        assert torch.equal(ours, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
    bn = keras_model.get_layer('conv3_block2_1_bn').get_weights()
    for value, name in zip(bn, ('weight', 'bias', 'running_mean', 'running_var')):
        assert torch.equal(converted.state_dict[f'stages.1.blocks.1.norm2.{name}'], torch.from_numpy(value))


@pytest.mark.keras
def test_unnamed_weights_h5_is_numbered_by_model_layers_not_by_name(keras_files):
    """The trap: the file key `max_pooling2d` is pool1_pool, and conv numbering follows model.layers order."""
    with h5py.File(keras_files['weights_h5'], 'r') as h5:
        names = {key: group['vars'].attrs['name'] for key, group in h5['layers'].items()}
    # pool1_pool is the first MaxPooling2D; the next key is an unnamed shortcut pool (Keras numbers its name globally)
    assert names['max_pooling2d'] == 'pool1_pool' and re.fullmatch(r'max_pooling2d(_\d+)?', names['max_pooling2d_1'])
    assert names['conv2d_3'] == 'conv2_block1_0_conv' and names['conv2d_4'] == 'conv2_block1_3_conv'
    with h5py.File(keras_files['weights_h5_unnamed'], 'r') as h5:
        assert not any('name' in group['vars'].attrs for group in h5['layers'].values())


@pytest.mark.keras
@pytest.mark.parametrize('dtype', ['float16', 'float64'])
def test_float16_and_float64_become_float32(keras_files, reference, tmp_path, dtype):
    path = _copy(keras_files['legacy_h5_weights'], tmp_path / f'{dtype}.h5')
    with h5py.File(path, 'a') as h5:
        for layer in h5.attrs['layer_names']:
            group = h5[layer]
            for name in group.attrs['weight_names']:
                value = group[name][()]
                del group[name]
                group[name] = value.astype(dtype)
    converted = convert_keras(path)
    expected = {k: v.numpy().astype(dtype).astype(np.float32) for k, v in reference.state_dict.items()
                if v.is_floating_point()}
    for key, value in expected.items():
        assert converted.state_dict[key].dtype == torch.float32
        np.testing.assert_array_equal(converted.state_dict[key].numpy(), value, err_msg=key)


@pytest.mark.keras
def test_build_model_re_heads_and_adapts_the_stem_like_timm(reference):
    gray = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rgb_features = build_model(reference, num_classes=0)(gray.expand(-1, 3, -1, -1))
        model = build_model(reference, in_chans=1, num_classes=3)
        assert not model.training
        assert model(gray).shape == (2, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model(gray), rgb_features, rtol=1e-4, atol=1e-5)


# --- bad inputs ---

def test_refuses_a_directory(tmp_path, workdir):
    _refused(tmp_path, workdir, str(tmp_path), 'is a directory')


def test_refuses_a_missing_file(tmp_path, workdir):
    _refused(tmp_path / 'nope.h5', workdir, 'nope.h5', 'no such file')


def test_refuses_a_file_that_is_not_hdf5(tmp_path, workdir):
    path = tmp_path / 'weights.h5'
    path.write_text('not weights\n')
    _refused(path, workdir, str(path), 'neither an HDF5 file nor a .keras archive')


def test_refuses_an_hdf5_file_that_is_not_keras(tmp_path, workdir):
    path = tmp_path / 'data.h5'
    with h5py.File(path, 'w') as h5:
        h5['images'] = np.zeros((2, 3), np.float32)
    _refused(path, workdir, str(path), 'not a Keras weights file', "['images']")


@pytest.mark.keras
@pytest.mark.parametrize('file_format', ['legacy_h5_weights', 'weights_h5'])
def test_refuses_resnet50_v1_as_v2(tmp_path, workdir, file_format):
    keras = import_keras()
    path = save_keras(keras.applications.ResNet50(weights=None), tmp_path, file_format)
    _refused(path, workdir, str(path), 'ResNet (v1)', 'resnet50_keras', 'resnet50v2_keras', arch='resnet50v2_keras')


@pytest.mark.keras
def test_refuses_another_architecture(tmp_path, workdir):
    keras = import_keras()
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, name='conv'),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name='predictions')])
    path = save_keras(model, tmp_path, 'keras_zip')
    _refused(path, workdir, str(path), 'not a Keras ResNet or ResNetV2 checkpoint', 'conv1_conv',
             'found conv, predictions')


@pytest.mark.keras
def test_refuses_an_unnamed_weights_h5_of_another_architecture(tmp_path, workdir):
    keras = import_keras()
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    path = strip_weights_h5_names(save_keras(model, tmp_path, 'weights_h5'), tmp_path / 'unnamed.weights.h5')
    _refused(path, workdir, str(path), 'without layer names', "'conv2d': 1", 'match no Keras ResNetV2')


@pytest.mark.keras
def test_refuses_a_missing_layer(keras_files, tmp_path, workdir):
    path = _copy(keras_files['weights_h5'], tmp_path / 'missing.weights.h5')
    with h5py.File(path, 'a') as h5:
        key = next(k for k, g in h5['layers'].items() if g['vars'].attrs['name'] == 'conv4_block3_2_bn')
        del h5['layers'][key]
    _refused(path, workdir, str(path), 'missing layers: conv4_block3_2_bn')


@pytest.mark.keras
def test_refuses_an_extra_layer(keras_files, tmp_path, workdir):
    path = _copy(keras_files['legacy_h5_weights'], tmp_path / 'extra.h5')
    with h5py.File(path, 'a') as h5:
        names = [n if isinstance(n, bytes) else n.encode() for n in h5.attrs['layer_names']]
        h5.attrs['layer_names'] = [*names, b'aux_dense']
        group = h5.create_group('aux_dense')
        group.attrs['weight_names'] = [b'aux_dense/kernel']
        group['aux_dense/kernel'] = np.zeros((2048, 3), np.float32)
    _refused(path, workdir, str(path), 'unexpected layers: aux_dense')


@pytest.mark.keras
def test_refuses_a_shape_mismatch(keras_files, tmp_path, workdir):
    path = _copy(keras_files['legacy_h5_weights'], tmp_path / 'shape.h5')
    with h5py.File(path, 'a') as h5:
        del h5['conv2_block1_0_conv/conv2_block1_0_conv/kernel']
        h5['conv2_block1_0_conv/conv2_block1_0_conv/kernel'] = np.zeros((1, 1, 64, 128), np.float32)
    _refused(path, workdir, str(path),
             'conv2_block1_0_conv/kernel: expected shape (1, 1, 64, 256), found (1, 1, 64, 128)')


@pytest.mark.keras
def test_refuses_integer_weights(keras_files, tmp_path, workdir):
    path = _copy(keras_files['legacy_h5_weights'], tmp_path / 'int.h5')
    with h5py.File(path, 'a') as h5:
        del h5['post_bn/post_bn/gamma']
        h5['post_bn/post_bn/gamma'] = np.ones(2048, np.int32)
    _refused(path, workdir, str(path), "layer 'post_bn' variable 'gamma' has dtype int32")


@pytest.mark.keras
def test_refuses_the_wrong_arch(keras_files, workdir):
    _refused(keras_files['keras_zip'], workdir, 'holds a resnet50v2_keras', 'not the requested resnet101v2_keras',
             arch='resnet101v2_keras')


@pytest.mark.keras
def test_refuses_labels_that_do_not_match_the_classes(keras_files, workdir):
    with pytest.raises(ResNetV2ZooError, match=f'3 label names given, but the checkpoint has {NUM_CLASSES} classes'):
        convert_to_dir(keras_files['weights_h5'], workdir / 'model', label_names=['a', 'b', 'c'])
    assert list(workdir.iterdir()) == []


# --- outputs ---

@pytest.mark.keras
def test_model_dir_loads_through_timm_and_the_package(keras_files, reference, workdir):
    out = convert_to_dir(keras_files['keras_zip'], workdir / 'model', label_names=LABELS)
    assert sorted(p.name for p in workdir.iterdir()) == ['model']  # no temporary left beside it
    config = json.loads((out / 'config.json').read_text())
    assert (config['architecture'], config['num_classes'], config['label_names']) == (ARCH, NUM_CLASSES, LABELS)
    with safetensors.safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        metadata = f.metadata()
    assert metadata['source_file'] == 'model.keras'
    assert metadata['source_sha256'] == hashlib.sha256(keras_files['keras_zip'].read_bytes()).hexdigest()
    assert metadata['converter_version'] == resnetv2_zoo.__version__
    assert metadata['keras_version'] == import_keras().__version__

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = build_model(reference)(images)
        loaded = [
            timm.create_model(ARCH, pretrained=True, num_classes=NUM_CLASSES, pretrained_cfg_overlay=dict(
                file=str(out / 'model.safetensors'), num_classes=NUM_CLASSES)),
            timm.create_model(f'local-dir:{out}', pretrained=True),
            load_model(out),
        ]
        for model in loaded:
            assert torch.equal(model.eval()(images), expected)


@pytest.mark.keras
def test_single_file_is_self_describing(keras_files, reference, workdir):
    out = convert_to_file(keras_files['legacy_h5_model'], workdir / 'model.safetensors', label_names=LABELS)
    assert cli.main(['convert', str(keras_files['keras_zip']), '-o', str(workdir / 'cli.safetensors'),
                     '--single-file']) == 0
    assert sorted(p.name for p in workdir.iterdir()) == ['cli.safetensors', 'model.safetensors']
    assert load_model(out).pretrained_cfg['label_names'] == tuple(LABELS)
    for path in (out, workdir / 'cli.safetensors'):
        for key, value in load_model(path).state_dict().items():
            assert torch.equal(value, reference.state_dict[key]), key


@pytest.mark.keras
def test_no_top_file_converts_to_a_headless_model_and_verifies(keras_resnet50v2, workdir, capsys):
    out = workdir / 'model'
    assert cli.main(['convert', str(keras_resnet50v2.file(False, 'weights_h5')), '-o', str(out), '--verify']) == 0
    printed = capsys.readouterr().out
    assert 'verify: max |keras - timm| over the pooled features' in printed and ': PASS' in printed
    model = load_model(out)
    assert model.num_classes == 0
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)


# --- command line ---

@pytest.mark.keras
def test_cli_converts_with_labels_and_verifies(keras_files, workdir, capsys):
    labels_file = workdir.parent / 'labels.txt'
    labels_file.write_text(''.join(f'{name}\n' for name in LABELS))
    out = workdir / 'model'
    assert cli.main(['convert', str(keras_files['legacy_h5_weights']), '-o', str(out),
                     '--labels', str(labels_file), '--verify']) == 0
    printed = capsys.readouterr().out
    assert 'verify: max |keras - timm| over the logits' in printed and ': PASS' in printed
    assert list(load_model(out).pretrained_cfg['label_names']) == LABELS


@pytest.mark.keras
def test_cli_refuses_bad_input_with_exit_code_2(keras_files, tmp_path, workdir, capsys):
    path = tmp_path / 'junk.keras'
    path.write_bytes(b'PK\x03\x04 not really a zip')
    assert cli.main(['convert', str(path), '-o', str(workdir / 'model')]) == 2
    assert str(path) in capsys.readouterr().err
    assert cli.main(['convert', str(keras_files['weights_h5']), '-o', str(workdir / 'model'),
                     '--arch', 'resnet152v2_keras']) == 2
    assert 'not the requested resnet152v2_keras' in capsys.readouterr().err
    assert list(workdir.iterdir()) == []


@pytest.mark.keras
def test_cli_verify_without_tensorflow_is_a_clear_error(keras_files, workdir, capsys, monkeypatch):
    def no_keras():
        raise ImportError('No module named tensorflow')

    monkeypatch.setattr('resnetv2_zoo.keras.runtime.import_keras', no_keras)
    assert cli.main(['convert', str(keras_files['weights_h5']), '-o', str(workdir / 'model'), '--verify']) == 2
    assert '--verify needs TensorFlow and Keras: No module named tensorflow' in capsys.readouterr().err
    assert list(workdir.iterdir()) == []


@pytest.mark.keras
def test_cli_verify_failure_exits_non_zero_and_writes_nothing(keras_files, workdir, capsys, monkeypatch):
    monkeypatch.setattr('resnetv2_zoo.weights.verify.TOLERANCE', 0.0)  # float32 Keras and PyTorch never agree to 0
    assert cli.main(['convert', str(keras_files['weights_h5']), '-o', str(workdir / 'model'), '--verify']) == 2
    captured = capsys.readouterr()
    assert ': FAIL' in captured.out and 'disagree; nothing written' in captured.err
    assert list(workdir.iterdir()) == []
