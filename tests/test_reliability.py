"""Bad inputs and faults: every refusal names the file and what is wrong, exits 2 from the CLI and leaves
nothing behind; a kill or a full disk never leaves a partial file that a later call would load.

The Keras files here are written with h5py from a timm model (`write_legacy_h5`), not by Keras, so these
tests run without TensorFlow and can make many damaged copies quickly; test_convert.py covers the files
Keras itself writes, except in the truncation family, whose `keras`-marked cases cut the files Keras writes.
"""
import dataclasses
import io
import os
import pickle
import shutil
import signal
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np
import pytest
import timm
import torch
from children import Child, python_child, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras_helpers import write_legacy_h5
from PIL import Image

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.keras.files import MAX_ZIP_MEMBER_BYTES
from resnetv2_zoo.keras.spec import KERAS_RESNETS
from resnetv2_zoo.train.data import build_transforms, image_files_under, load_rgb, scan_image_folder
from resnetv2_zoo.train.evaluate import evaluate_folder
from resnetv2_zoo.train.finetune import create_classifier, finetune_args
from resnetv2_zoo.train.predict import predict_files
from resnetv2_zoo.weights import pretrained
from resnetv2_zoo.weights.checkpoint import load_model, save_model_dir, save_weights_file
from resnetv2_zoo.weights.convert import convert_keras, convert_to_dir, convert_to_file

ARCH = 'resnet50v2_keras'
REPO = Path(__file__).resolve().parents[1]
# Each parametrized case and each fault below adds to these counts, quoted in the note.
TRUNCATION_OFFSETS = (1, 7, 8, 96, 512, 2048, 1 << 16, 1 << 20, -(1 << 20), -4096, -1)


@pytest.fixture(scope='module')
def weights() -> Dict[str, torch.Tensor]:
    """A seeded headless ResNet50V2 with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point() and 'norm' in name:
                value.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture(scope='module')
def keras_h5(weights, tmp_path_factory) -> Path:
    """The weights as a float16 Keras 2 `.h5` (47 MB: half the float32 size, converted exactly)."""
    return write_legacy_h5(weights, ARCH, tmp_path_factory.mktemp('keras') / 'resnet50v2_notop.h5', 'float16')


@pytest.fixture(scope='module')
def expected(keras_h5):
    return convert_keras(keras_h5)


@pytest.fixture
def workdir(tmp_path) -> Path:
    out = tmp_path / 'out'
    out.mkdir()
    return out


def refused(source: Path, workdir: Path, *fragments: str, capsys=None) -> str:
    """API and CLI both refuse `source`, naming it and each fragment; nothing, not even a dot-file, is left."""
    with pytest.raises(ResNetV2ZooError) as info:
        convert_to_dir(source, workdir / 'model')
    message = str(info.value)
    for fragment in (str(source), *fragments):
        assert fragment in message, message
    if capsys is not None:
        capsys.readouterr()
        assert main(['convert', str(source), '-o', str(workdir / 'cli')]) == 2
        assert str(source) in capsys.readouterr().err
    assert list(workdir.iterdir()) == []
    return message


def assert_same(converted, expected) -> None:
    assert converted.state_dict.keys() == expected.state_dict.keys()
    for key, value in expected.state_dict.items():
        assert torch.equal(converted.state_dict[key], value), key


# --- converter: damaged files ---

def test_refuses_an_empty_file(tmp_path, workdir, capsys):
    path = tmp_path / 'empty.h5'
    path.touch()
    refused(path, workdir, 'is empty (0 bytes)', capsys=capsys)


# One truncation family: the h5py-written Keras 2 file cut at offsets through its structure and its data,
# and each container Keras itself writes (Keras 2 `.h5`, Keras 3 `.weights.h5`, `.keras` zip) cut in half.
TRUNCATIONS = [pytest.param('h5py_legacy_h5', offset, id=f'h5py_legacy_h5-{offset}') for offset in TRUNCATION_OFFSETS]
TRUNCATIONS += [pytest.param(f'keras:{fmt}', 0.5, id=f'keras-{fmt}-half', marks=pytest.mark.keras)
                for fmt in ('legacy_h5_weights', 'weights_h5', 'keras_zip')]


@pytest.mark.parametrize('source, cut', TRUNCATIONS)
def test_refuses_a_truncated_file(keras_h5, request, tmp_path, workdir, source, cut):
    original = (request.getfixturevalue('keras_resnet50v2').file(True, source.split(':')[1])
                if source.startswith('keras:') else keras_h5)
    data = original.read_bytes()
    path = tmp_path / f'truncated_{original.name}'
    path.write_bytes(data[:int(cut * len(data))] if isinstance(cut, float) else data[:cut % len(data)])
    message = refused(path, workdir)
    assert 'truncated or corrupt' in message or 'neither an HDF5 file' in message, message


def _copy_with(keras_h5: Path, path: Path, edit) -> Path:
    shutil.copyfile(keras_h5, path)
    with h5py.File(path, 'a') as h5:
        edit(h5)
    return path


def _replace(h5: h5py.File, name: str, value) -> None:
    del h5[name]
    h5[name] = value


@pytest.mark.parametrize('bad', ['nan', 'inf', '-inf'])
def test_refuses_nonfinite_values_naming_the_layers_unless_allowed(keras_h5, expected, tmp_path, workdir, capsys,
                                                                   bad):
    def poison(h5):
        kernel = h5['conv3_block2_2_conv/conv3_block2_2_conv/kernel:0'][()]
        kernel[0, 0, 0, :2] = float(bad)
        _replace(h5, 'conv3_block2_2_conv/conv3_block2_2_conv/kernel:0', kernel)
        _replace(h5, 'post_bn/post_bn/moving_variance:0', np.full(2048, float(bad), np.float16))

    path = _copy_with(keras_h5, tmp_path / f'{bad}.h5', poison)
    counts = (2, 2048) if bad == 'nan' else (0, 0)
    message = refused(path, workdir, 'non-finite values', '--allow-nonfinite',
                      f'conv3_block2_2_conv/kernel: {counts[0]} NaN, {2 - counts[0]} Inf',
                      f'post_bn/moving_variance: {counts[1]} NaN, {2048 - counts[1]} Inf', capsys=capsys)
    assert message.count('NaN') == 2  # only the two poisoned tensors are listed
    converted = convert_keras(path, allow_nonfinite=True)
    assert bool(torch.isnan(converted.state_dict['norm.running_var']).all()) == (bad == 'nan')
    assert main(['convert', str(path), '-o', str(workdir / 'allowed'), '--allow-nonfinite']) == 0
    assert not torch.isfinite(load_model(workdir / 'allowed').state_dict()['norm.running_var']).any()


def test_float64_weights_are_converted(keras_h5, expected, tmp_path):
    def widen(h5):
        for layer in h5.attrs['layer_names']:
            for name in h5[layer].attrs['weight_names']:
                _replace(h5[layer], name, h5[layer][name][()].astype(np.float64))

    assert_same(convert_keras(_copy_with(keras_h5, tmp_path / 'f64.h5', widen)), expected)


# --- converter: files that would make us read other files or allocate without bound ---

def test_refuses_an_external_link(keras_h5, tmp_path, workdir, capsys):
    secret = tmp_path / 'secret.h5'
    with h5py.File(secret, 'w') as h5:
        h5['kernel:0'] = np.ones((3, 3, 64, 64), np.float16)

    def link_out(h5):
        del h5['conv2_block1_2_conv/conv2_block1_2_conv/kernel:0']
        h5['conv2_block1_2_conv/conv2_block1_2_conv/kernel:0'] = h5py.ExternalLink(str(secret), 'kernel:0')

    path = _copy_with(keras_h5, tmp_path / 'external_link.h5', link_out)
    refused(path, workdir, 'external link to', str(secret), 'refusing to read other files', capsys=capsys)


def test_refuses_a_virtual_dataset(keras_h5, tmp_path, workdir):
    outside = tmp_path / 'outside.h5'
    with h5py.File(outside, 'w') as h5:
        h5['data'] = np.ones(2048, np.float16)

    def virtual(h5):
        layout = h5py.VirtualLayout(shape=(2048,), dtype=np.float16)
        layout[:] = h5py.VirtualSource(str(outside), 'data', shape=(2048,))
        del h5['post_bn/post_bn/gamma:0']
        h5['post_bn'].create_virtual_dataset('post_bn/gamma:0', layout)

    path = _copy_with(keras_h5, tmp_path / 'virtual.h5', virtual)
    refused(path, workdir, 'post_bn/post_bn/gamma:0 is a virtual dataset', 'refusing to read other files')


def test_refuses_external_raw_storage(keras_h5, tmp_path, workdir):
    raw = tmp_path / 'raw.bin'
    raw.write_bytes(np.ones(2048, np.float16).tobytes())

    def external(h5):
        del h5['post_bn/post_bn/beta:0']
        h5['post_bn'].create_dataset('post_bn/beta:0', (2048,), np.float16, external=[(str(raw), 0, 4096)])

    path = _copy_with(keras_h5, tmp_path / 'external_storage.h5', external)
    refused(path, workdir, 'post_bn/post_bn/beta:0 is stored in external files')


def test_refuses_a_declared_size_bomb(keras_h5, tmp_path, workdir):
    """A chunked dataset may declare any size and read back as fill value: 4 TiB from a few bytes on disk."""
    def bomb(h5):
        del h5['post_bn/post_bn/beta:0']
        h5['post_bn'].create_dataset('post_bn/beta:0', (1 << 40,), np.float32, chunks=(1 << 16,), fillvalue=1.0)

    path = _copy_with(keras_h5, tmp_path / 'bomb.h5', bomb)
    assert path.stat().st_size < keras_h5.stat().st_size + (1 << 16)  # a few bytes more, declaring 4 TiB
    refused(path, workdir, 'post_bn/post_bn/beta:0 declares shape (1099511627776,)', 'at most')


def test_refuses_values_never_written(keras_h5, tmp_path, workdir):
    """A dataset created but never written reads back as its fill value (zeros): a damaged file, not weights."""
    def unwritten(h5):
        del h5['post_bn/post_bn/moving_variance:0']
        h5['post_bn'].create_dataset('post_bn/moving_variance:0', (2048,), np.float16)

    path = _copy_with(keras_h5, tmp_path / 'unwritten.h5', unwritten)
    refused(path, workdir, 'post_bn/post_bn/moving_variance:0 has only 0 of its 4096 bytes of values')


# --- converter: .keras archives ---

def _zip(path: Path, members: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_refuses_a_keras_archive_without_weights(tmp_path, workdir, capsys):
    path = _zip(tmp_path / 'model.keras', {'config.json': b'{}', 'metadata.json': b'{}'})
    refused(path, workdir, 'without model.weights.h5', "['config.json', 'metadata.json']", capsys=capsys)


@pytest.mark.parametrize('name', ['../model.weights.h5', '/etc/model.weights.h5', 'a/../../x', '..\\x', 'C:/x'])
def test_refuses_path_traversal_member_names(keras_h5, tmp_path, workdir, name):
    path = _zip(tmp_path / 'model.keras', {'model.weights.h5': b'x', name: b'x'})
    refused(path, workdir, repr(name), 'points outside the archive')


def test_refuses_a_zip_bomb_before_inflating_it(tmp_path, workdir):
    cap = MAX_ZIP_MEMBER_BYTES['config.json']
    path = _zip(tmp_path / 'bomb.keras', {'config.json': b' ' * (cap + 1), 'model.weights.h5': b'x'})
    assert path.stat().st_size < cap // 500  # about 1000:1, as deflate allows
    refused(path, workdir, f'config.json declares {cap + 1} bytes uncompressed', 'zip bomb')


def test_refuses_a_damaged_config_json(keras_h5, tmp_path, workdir):
    path = _zip(tmp_path / 'model.keras', {'config.json': b'{"config": ', 'model.weights.h5': keras_h5.read_bytes()})
    refused(path, workdir, 'damaged .keras archive', 'JSONDecodeError')


# --- converter: outputs ---

def test_refuses_an_output_in_a_missing_directory_or_under_a_file(keras_h5, tmp_path, capsys):
    plain_file = tmp_path / 'plain'
    plain_file.write_text('x')
    for out, reason in ((tmp_path / 'missing' / 'model', 'does not exist'), (plain_file / 'model', 'not a directory')):
        for argv in (['-o', str(out)], ['-o', str(out), '--single-file']):
            assert main(['convert', str(keras_h5), *argv]) == 2
            assert f'cannot write {out}' in (err := capsys.readouterr().err) and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['plain']


_CONVERT_CHILD = """
import sys
from resnetv2_zoo.cli import main
sys.exit(main(['convert', *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_refuses_an_output_in_a_read_only_directory(keras_h5, tmp_path):
    """Root ignores directory permissions, so under root the converter runs without that capability."""
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    read_only.chmod(0o555)
    for name, extra in (('model', []), ('model.safetensors', ['--single-file'])):
        result = run_python(_CONVERT_CHILD, str(keras_h5), '-o', str(read_only / name), *extra, timeout=300,
                            no_root_file_access=True)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f'cannot write {read_only / name}: Permission denied' in result.stderr
        assert list(read_only.iterdir()) == []


# --- property-based: damaged files are refused with our error, never anything else ---

def _raw_data_ranges(path: Path) -> List[range]:
    ranges = []
    with h5py.File(path, 'r') as h5:
        def visit(_, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                ranges.append(range(obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))
        h5.visititems(visit)
    return ranges


@pytest.fixture(scope='module')
def structure_bytes(keras_h5) -> np.ndarray:
    """Offsets of the bytes that are HDF5 structure (superblock, object headers, B-trees, heaps, attributes),
    not tensor values: Keras files carry no checksums, so a flipped value byte is undetectable by design."""
    is_data = np.zeros(keras_h5.stat().st_size, bool)
    for span in _raw_data_ranges(keras_h5):
        is_data[span.start:span.stop] = True
    return np.flatnonzero(~is_data)


def _convert_or_refuse(data: bytes, expected, directory: Path) -> None:
    path = directory / 'mutant.h5'
    path.write_bytes(data)
    try:
        converted = convert_keras(path)
    except ResNetV2ZooError as e:
        assert str(path) in str(e)
        return
    assert_same(converted, expected)


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1,
                          max_size=8))
def test_mutated_structure_converts_identically_or_is_refused(keras_h5, expected, structure_bytes, tmp_path,
                                                               mutations):
    data = bytearray(keras_h5.read_bytes())
    for where, flip in mutations:
        data[structure_bytes[int(where * len(structure_bytes))]] ^= flip
    _convert_or_refuse(bytes(data), expected, tmp_path)


# --- faults: kill -9 and a full disk ---

def _entries(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir())


def _kill_when(child: Child, appears, delay: float, timeout: float = 300) -> bool:
    """SIGKILL `child` `delay` seconds after `appears()` turns true; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not appears():
        if child.poll() is not None:
            return False
        assert time.monotonic() < deadline, 'the child never started writing'
        time.sleep(0.002)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    return child.returncode == -signal.SIGKILL


def _assert_loads_as(path: Path, expected_state: Dict[str, torch.Tensor]) -> None:
    loaded = load_model(path).state_dict()
    assert loaded.keys() == expected_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected_state.items())


@pytest.mark.slow(seconds=8)
def test_kill_during_conversion_leaves_no_partial_output(keras_h5, expected, tmp_path):
    """Killed while writing (fresh or over a previous output): the output is absent, the previous one, or whole."""
    good = timm.create_model(ARCH, num_classes=0)
    good.load_state_dict(expected.state_dict)
    kills = 0
    for i, (delay, previous) in enumerate([(0.0, False), (0.15, False), (0.0, True), (0.1, True)]):
        parent = tmp_path / f'kill{i}'
        parent.mkdir()
        out = parent / 'model'
        if previous:
            save_model_dir(timm.create_model(ARCH, num_classes=0), out)  # another model, to tell them apart
            previous_state = load_model(out).state_dict()
        child = python_child(_CONVERT_CHILD, str(keras_h5), '-o', str(out))
        kills += _kill_when(child, lambda d=parent: any(n.startswith('.model.') for n in os.listdir(d)), delay)
        assert all(n == 'model' or n.startswith('.model.') for n in _entries(parent)), _entries(parent)
        if out.exists():  # the rename is atomic: a model directory that is there is the old or the new one, whole
            state = load_model(out).state_dict()
            candidates = [good.state_dict()] + ([previous_state] if previous else [])
            assert any(all(torch.equal(state[k], v) for k, v in c.items()) for c in candidates)
        convert_to_dir(keras_h5, out)  # the next call succeeds, whatever was left
        _assert_loads_as(out, good.state_dict())
    assert kills >= 3  # most runs were really killed mid-write (a fast one may finish first)


_CACHE_CHILD = """
import sys, timm
from resnetv2_zoo.weights import pretrained
import dataclasses
from resnetv2_zoo.keras.spec import KERAS_RESNETS
spec = KERAS_RESNETS['resnet50v2_keras']
KERAS_RESNETS[spec.arch] = dataclasses.replace(spec, weights_md5=(sys.argv[1], sys.argv[1]))
timm.create_model('resnet50v2_keras', pretrained=True)
"""


@pytest.fixture(scope='module')
def keras_cache(tmp_path_factory) -> Path:
    """A Keras cache holding a stand-in for the official ResNet50V2 file (1000 classes)."""
    torch.manual_seed(1)
    model = timm.create_model(ARCH)
    keras_home = tmp_path_factory.mktemp('keras_home')
    (keras_home / 'models').mkdir()
    write_legacy_h5(model.state_dict(), ARCH, keras_home / 'models' / pretrained.keras_weights_file_name(ARCH),
                    'float16')
    return keras_home


@pytest.mark.slow
def test_kill_during_the_pretrained_cache_fill(keras_cache, tmp_path, monkeypatch):
    h5 = keras_cache / 'models' / pretrained.keras_weights_file_name(ARCH)
    md5 = pretrained.file_hexdigest(h5, 'md5')
    cache = tmp_path / 'cache'
    env = dict(os.environ, RESNETV2_ZOO_CACHE=str(cache), KERAS_HOME=str(keras_cache), RESNETV2_ZOO_OFFLINE='1')
    kills = 0
    for delay in (0.0, 0.15, 0.4):
        child = python_child(_CACHE_CHILD, md5, env=env)
        kills += _kill_when(child, lambda: cache.is_dir() and any(n.endswith('.tmp') for n in os.listdir(cache)),
                            delay)
        found = pretrained._find_converted(ARCH, (True,))
        monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(cache))
        if found is not None:  # complete, or it would not be there
            assert load_model(found.parent).num_classes == 1000
        shutil.rmtree(cache / f'{ARCH}.{pretrained.PRETRAINED_TAG}', ignore_errors=True)  # kill the next run anew
    assert kills >= 2
    monkeypatch.setenv('KERAS_HOME', str(keras_cache))
    monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
    set_official_md5s(monkeypatch, (md5, md5))
    model = timm.create_model(ARCH, pretrained=True)
    reference = convert_keras(h5).state_dict
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


_DISK_FULL_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
if sys.argv[2] == 'convert':
    from resnetv2_zoo.cli import main
    sys.exit(main(sys.argv[2:]))
import timm
import resnetv2_zoo
from resnetv2_zoo.weights.checkpoint import save_weights_file
from resnetv2_zoo.train.data import build_transforms, image_files_under, load_rgb, scan_image_folder
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.evaluate import evaluate_folder
from resnetv2_zoo.train.finetune import create_classifier, finetune_args
try:
    save_weights_file(timm.create_model('resnet50v2_keras', num_classes=3), sys.argv[3])
except ResNetV2ZooError as e:
    sys.exit(f'error: {e}')
"""


@pytest.mark.slow
def test_disk_full_while_writing_keeps_the_previous_file(keras_h5, tmp_path):
    limit = str(8 << 20)  # 8 MiB: imports write nothing, the ~94 MB weights file fails part-way
    out = convert_to_dir(keras_h5, tmp_path / 'model')
    checkpoint = tmp_path / 'checkpoint.safetensors'
    convert_to_file(keras_h5, checkpoint)
    before = {p: p.read_bytes() for p in (out / 'model.safetensors', out / 'config.json', checkpoint)}
    for argv in (['convert', str(keras_h5), '-o', str(out)],
                 ['convert', str(keras_h5), '-o', str(checkpoint), '--single-file'],
                 ['checkpoint', str(checkpoint)]):
        result = run_python(_DISK_FULL_CHILD, limit, *argv, timeout=300)
        assert result.returncode in (1, 2), result.stderr[-2000:]
        assert 'cannot write' in result.stderr and 'File too large' in result.stderr, result.stderr[-2000:]
        assert str(tmp_path) in result.stderr and 'Traceback' not in result.stderr, result.stderr[-2000:]
        assert _entries(tmp_path) == ['checkpoint.safetensors', 'model']  # no temporary left
        assert all(p.read_bytes() == data for p, data in before.items())


# --- fine-tune / evaluate / predict: hostile images and mismatched checkpoints ---

def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header declares width x height: what a decompression bomb looks like to PIL."""
    buffer = io.BytesIO()
    Image.new('RGB', (1, 1)).save(buffer, 'PNG')
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack('>II', width, height)  # IHDR data follows the 8-byte signature, length and type
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _image_folder(root: Path, classes=('a', 'b'), per_class: int = 2) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (12, 10), (40 * i, 90, 200)).save(root / name / f'{i}.jpg')
    return root


@pytest.fixture(scope='module')
def classifier(tmp_path_factory) -> Path:
    """A 2-class model directory with label names a, b."""
    torch.manual_seed(0)
    return save_model_dir(timm.create_model(ARCH, num_classes=2), tmp_path_factory.mktemp('clf') / 'model', ['a', 'b'])


def test_decompression_bomb_header_is_skipped_not_decoded(classifier, tmp_path, caplog):
    root = _image_folder(tmp_path / 'data')
    bomb = _png_declaring(root / 'a' / 'bomb.png', 20000, 20000)
    with pytest.raises(Image.DecompressionBombError, match='400000000 pixels'):  # refused at open, before decoding
        Image.open(bomb)
    scan = scan_image_folder(root)
    assert [(p, r.split(':')[0]) for p, r in scan.skipped] == [(str(bomb), 'DecompressionBombError')]
    assert len(scan.samples) == 4 and 'skipping unreadable image' in caplog.text
    caplog.clear()
    predictions = predict_files(str(classifier), [str(bomb), str(root / 'b' / '0.jpg')], img_size=32)
    assert [p.path for p in predictions] == [str(root / 'b' / '0.jpg')]
    assert f'skipping unreadable image {bomb} (DecompressionBombError' in caplog.text


def test_one_pixel_images_train_and_predict(classifier, tmp_path):
    root = _image_folder(tmp_path / 'data')
    tiny = root / 'a' / 'tiny.png'
    Image.new('RGB', (1, 1), (255, 0, 0)).save(tiny)
    assert (str(tiny), 0) in scan_image_folder(root).samples
    train, evaluation = build_transforms(load_model(classifier), 32)
    assert train(load_rgb(tiny)).shape == evaluation(load_rgb(tiny)).shape == (3, 32, 32)
    (prediction,) = predict_files(str(classifier), [str(tiny)], k=2, img_size=32)
    assert sorted(name for name, _ in prediction.top) == ['a', 'b']


def test_symlink_loops_and_linked_copies_count_each_image_once(tmp_path, caplog):
    root = _image_folder(tmp_path / 'data')
    (root / 'a' / 'loop').symlink_to(root / 'a', target_is_directory=True)  # os.walk(followlinks) recurses ~40 deep
    (root / 'b' / 'self.jpg').symlink_to(root / 'b' / 'self.jpg')  # a link to itself: ELOOP on open
    (root / 'b' / 'copy.jpg').symlink_to(root / 'a' / '0.jpg')  # the same file under another class
    scan = scan_image_folder(root)
    assert sorted(scan.samples) == [(str(root / c / f'{i}.jpg'), t) for t, c in enumerate('ab') for i in range(2)]
    (skipped_path, reason), = scan.skipped
    assert skipped_path == str(root / 'b' / 'self.jpg') and 'Too many levels of symbolic links' in reason
    assert f'81 paths under {root} lead to files already listed' in caplog.text  # 2 images x 40 loop levels + copy
    assert image_files_under([root]) == sorted(str(p) for p in root.rglob('*.jpg') if 'loop' not in p.parts)


def test_non_image_files_are_skipped_and_none_readable_is_an_error(classifier, tmp_path, capsys):
    notes, fake, empty = tmp_path / 'notes.txt', tmp_path / 'photo.jpg', tmp_path / 'empty.png'
    notes.write_text('hello')
    fake.write_bytes(pickle.dumps({'not': 'an image'}))
    empty.touch()
    assert main(['predict', str(classifier), str(notes), str(fake), str(empty), '--img-size', '32']) == 2
    assert 'no readable image in' in capsys.readouterr().err


def test_checkpoint_for_other_classes(classifier, tmp_path, capsys):
    """evaluate refuses class folders the checkpoint does not know; --init keeps the backbone and resets the head."""
    data = _image_folder(tmp_path / 'data', classes=('a', 'b', 'c'))
    assert main(['evaluate', str(classifier), '--data', str(data), '--img-size', '32', '--plot', '']) == 2
    assert "class folders ['c'] that" in capsys.readouterr().err
    unnamed = save_weights_file(timm.create_model(ARCH, num_classes=3), tmp_path / 'unnamed.safetensors')
    with pytest.raises(ResNetV2ZooError, match=r"class folders \['a', 'b', 'c'\]"):
        evaluate_folder(str(unnamed), str(data), img_size=32)

    args = finetune_args(['--data', str(data), '--out', str(tmp_path / 'run'), '--init', str(classifier)])
    model, source = create_classifier(args, 3, resuming=False)
    assert model.num_classes == 3 and source == f'init {classifier}'
    before = load_model(classifier).state_dict()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith('head.'))
    assert after['head.fc.weight'].shape == (3, 2048)


def set_official_md5s(monkeypatch, md5s) -> None:
    """Make `md5s` (with top, without top) the published MD5s of ARCH's official Keras files for this test."""
    monkeypatch.setitem(KERAS_RESNETS, ARCH, dataclasses.replace(KERAS_RESNETS[ARCH], weights_md5=tuple(md5s)))
