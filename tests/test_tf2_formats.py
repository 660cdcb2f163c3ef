"""Keras 2 files as TensorFlow 2 wrote them, by real Keras 2 (`tf_keras`), converted without TensorFlow.

Every format Keras 2 writes: full-model and weights `.h5`, SavedModel directories (`model.save(dir)`) and
TF checkpoints (`save_weights('cp.ckpt')`, `ModelCheckpoint(save_weights_only=True)`), each compared with
Keras 2's own `predict`; a nested base + Dense head; the crc32c against TensorFlow's; and damaged or
foreign files, each refused naming the file and the tensor. The Keras 2 models and their files are built
once per test run, for every xdist worker (conftest's `built_once`); tests read them and never change them.
"""
import functools
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from keras_helpers import randomize_weights

from resnetv2_zoo import cli
from resnetv2_zoo.errors import KerasFileError
from resnetv2_zoo.keras import tf_checkpoint
from resnetv2_zoo.keras.files import read_keras_weights
from resnetv2_zoo.keras.runtime import import_tf_keras
from resnetv2_zoo.keras.tf_checkpoint import crc32c, masked_crc32c
from resnetv2_zoo.weights.checkpoint import load_model, read_weights_metadata
from resnetv2_zoo.weights.convert import build_model, convert_keras, convert_to_dir
from resnetv2_zoo.weights.verify import parity_tolerance

NUM_CLASSES = 10
HEAD_CLASSES = 7
SIZES = (224, 97)
BATCH = 2


# --- crc32c ---

def _crc32c_bitwise(data: bytes) -> int:
    """The textbook bit-at-a-time CRC-32C: the definition, independent of any table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert crc32c(b'123456789') == 0xE3069283  # the CRC catalogue's check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b'\xff' * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b'') == 0


def test_crc32c_matches_the_definition_at_every_length_and_chunking():
    rng = np.random.default_rng(0)
    for size in [*range(0, 70), 255, 256, 1000, 4095, 4097, 9999, 65537]:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_bitwise(data), size
    data = bytearray(rng.integers(0, 256, 9999, dtype=np.uint8).tobytes())
    before = crc32c(data)
    data[5000] ^= 1  # control: one flipped bit changes it
    assert crc32c(data) != before


def test_crc32c_is_fast():
    """A 100 MB checkpoint is verified in about a second; a byte loop in Python would take minutes."""
    data = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8)
    start = time.perf_counter()
    crc32c(data)
    assert time.perf_counter() - start < 10  # ~0.3 s on one idle core; the margin is for loaded CI machines


# --- Keras 2 models and files, built once ---

@pytest.fixture(scope='session')
def tf_keras() -> Any:
    return import_tf_keras()  # torch and timm first, as everywhere


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _predict(model: Any, images: torch.Tensor) -> np.ndarray:
    return np.asarray(model.predict(images.permute(0, 2, 3, 1).numpy(), batch_size=BATCH, verbose=0))


def _model_checkpoint(tf_keras: Any, model: Any, prefix: Path) -> None:
    """What `fit(callbacks=[ModelCheckpoint(prefix, save_weights_only=True)])` writes at an epoch's end."""
    callback = tf_keras.callbacks.ModelCheckpoint(str(prefix), save_weights_only=True)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, logs={})


def _save_outputs(path: Path, outputs: Dict[int, np.ndarray]) -> None:
    np.savez(path, **{str(size): value for size, value in outputs.items()})


def _load_outputs(path: Path) -> Dict[int, np.ndarray]:
    with np.load(path) as saved:
        return {int(size): saved[size] for size in saved.files}


FLAT_FILES = {
    'full_h5': 'model.h5',
    'weights_h5': 'weights.h5',
    'saved_model': 'saved_model',
    'tf_checkpoint': 'ckpt/cp.ckpt',
    'model_checkpoint': 'training_1/cp.ckpt',
}


def _build_flat(tf_keras: Any, root: Path) -> None:
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.applications.ResNet50V2(weights=None, classes=NUM_CLASSES, classifier_activation=None)
    randomize_weights(model, seed=1)
    files = {name: root / relative for name, relative in FLAT_FILES.items()}
    model.save(files['full_h5'])
    model.save_weights(files['weights_h5'])
    # Without traced call functions: 1.5 s instead of 8.5. The converter reads the variables and keras_metadata.pb,
    # which are the same either way (identical tensors, checked), and the nested model below is saved with them.
    model.save(files['saved_model'], save_traces=False)
    model.save_weights(str(files['tf_checkpoint']))
    _model_checkpoint(tf_keras, model, files['model_checkpoint'])
    # The same weights at another input size: the top fixes Keras's input shape.
    at_97 = tf_keras.applications.ResNet50V2(weights=None, classes=NUM_CLASSES, classifier_activation=None,
                                             input_shape=(97, 97, 3))
    at_97.set_weights(model.get_weights())
    _save_outputs(root / 'outputs.npz', {224: _predict(model, _images(224)), 97: _predict(at_97, _images(97))})


@pytest.fixture(scope='session')
def flat(tf_keras, built_once) -> Dict[str, Any]:
    """ResNet50V2 with a 10-class top, seeded random weights and BN statistics, in every Keras 2 format, and
    Keras 2's `predict` on a seeded batch at 224 and 97 px."""
    root = built_once('tf2_flat', functools.partial(_build_flat, tf_keras))
    return {'files': {name: root / relative for name, relative in FLAT_FILES.items()},
            'outputs': _load_outputs(root / 'outputs.npz')}


NESTED_FILES = {
    'tf_checkpoint': 'training_1/cp.ckpt',
    'saved_model': 'saved_model',
    'weights_only': 'weights/cp.ckpt',
}


def _build_nested(tf_keras: Any, root: Path) -> None:
    tf_keras.utils.set_random_seed(0)
    base = tf_keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(None, None, 3))
    randomize_weights(base, seed=2)
    inputs = tf_keras.Input((None, None, 3))
    head = tf_keras.layers.Dense(HEAD_CLASSES)
    model = tf_keras.Model(inputs, head(tf_keras.layers.GlobalAveragePooling2D()(base(inputs))))
    rng = np.random.default_rng(3)
    head.set_weights([rng.normal(0, 0.03, (2048, HEAD_CLASSES)).astype(np.float32),
                      rng.uniform(-0.1, 0.1, HEAD_CLASSES).astype(np.float32)])
    files = {name: root / relative for name, relative in NESTED_FILES.items()}
    # eagerly: the same step and the same files, without tracing a training graph of ResNet50V2 (seconds)
    model.compile(optimizer=tf_keras.optimizers.SGD(1e-3), loss='mse', run_eagerly=True)
    x = rng.uniform(-1, 1, (BATCH, 64, 64, 3)).astype(np.float32)
    y = rng.normal(0, 1, (BATCH, HEAD_CLASSES)).astype(np.float32)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[
        tf_keras.callbacks.ModelCheckpoint(str(files['tf_checkpoint']), save_weights_only=True)])
    model.save(files['saved_model'])
    model.save_weights(str(files['weights_only']))
    _save_outputs(root / 'outputs.npz', {size: _predict(model, _images(size)) for size in SIZES})
    np.savez(root / 'trained.npz', head_kernel=head.get_weights()[0],
             post_bn_moving_variance=base.get_layer('post_bn').get_weights()[3])


@pytest.fixture(scope='session')
def nested(tf_keras, built_once) -> Dict[str, Any]:
    """A no-top ResNet50V2 nested in a model with pooling and a 7-class Dense head, trained one step with
    `ModelCheckpoint(save_weights_only=True)` (so the checkpoint holds optimizer slots too), then saved;
    Keras 2's `predict` at each size, and the trained head kernel and `post_bn` variance."""
    root = built_once('tf2_nested', functools.partial(_build_nested, tf_keras))
    with np.load(root / 'trained.npz') as trained:
        arrays = {name: trained[name] for name in trained.files}
    return {'files': {name: root / relative for name, relative in NESTED_FILES.items()},
            'outputs': _load_outputs(root / 'outputs.npz'), **arrays}


def _check_parity(converted: Any, outputs: Dict[int, np.ndarray], label: str) -> None:
    """The converted model matches Keras 2's `predict` at every size, within the project tolerance."""
    model = build_model(converted)
    for size, reference in outputs.items():
        with torch.no_grad():
            ours = model(_images(size)).numpy()
        assert ours.shape == reference.shape
        diff = float(np.abs(ours - reference).max())
        print(f'{label} @ {size}: max |keras2 - ours| = {diff:.3g} (tolerance {parity_tolerance(reference):.3g})')
        assert diff <= parity_tolerance(reference)
        assert np.abs(reference).max() > 1  # control: outputs are not vanishingly small, so the bound is not vacuous


FLAT_FORMATS = {'full_h5': 'legacy_h5_model', 'weights_h5': 'legacy_h5_weights', 'saved_model': 'saved_model',
                'tf_checkpoint': 'tf_checkpoint', 'model_checkpoint': 'tf_checkpoint'}


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.parametrize('name', list(FLAT_FORMATS))
def test_keras2_files_match_keras2_predict(flat, name):
    path = flat['files'][name]
    converted = convert_keras(path)
    assert (converted.arch, converted.num_classes) == ('resnet50v2_keras', NUM_CLASSES)
    assert converted.metadata['source_format'] == FLAT_FORMATS[name]
    _check_parity(converted, flat['outputs'], name)


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.parametrize('name', ['tf_checkpoint', 'saved_model', 'weights_only'])
def test_nested_base_and_dense_head_match_keras2_predict(nested, name):
    path = nested['files'][name]
    converted = convert_keras(path)
    assert (converted.arch, converted.num_classes) == ('resnet50v2_keras', HEAD_CLASSES)
    _check_parity(converted, nested['outputs'], f'nested {name}')


@pytest.mark.keras
def test_nested_checkpoint_maps_the_trained_head_by_name(nested):
    """The head is read from the file as `predictions`, and its values are the trained Dense's, not the base's."""
    weights = read_keras_weights(nested['files']['tf_checkpoint'])
    np.testing.assert_array_equal(weights.layers['predictions']['kernel'], nested['head_kernel'])
    np.testing.assert_array_equal(weights.layers['post_bn']['moving_variance'], nested['post_bn_moving_variance'])
    assert not any(name.startswith(('optimizer', 'dense', 'SGD')) for name in weights.layers)


@pytest.mark.keras
def test_every_way_of_naming_a_checkpoint_reads_the_same(flat, tmp_path):
    prefix = flat['files']['tf_checkpoint']
    names = [prefix, Path(f'{prefix}.index'), prefix.parent, Path(f'{prefix}.data-00000-of-00001'), str(prefix)]
    reads = [read_keras_weights(name) for name in names]
    for weights in reads:
        assert weights.source_format == 'tf_checkpoint' and weights.layers.keys() == reads[0].layers.keys()
        for layer, variables in reads[0].layers.items():
            for var, value in variables.items():
                np.testing.assert_array_equal(weights.layers[layer][var], value)
    # The folder of several checkpoints: the `checkpoint` file's latest, even after the folder moved.
    moved = tmp_path / 'moved'
    shutil.copytree(prefix.parent, moved)
    (moved / 'checkpoint').write_text(f'model_checkpoint_path: "{prefix}-gone"\n'
                                      f'all_model_checkpoint_paths: "{prefix}-gone"\n')
    with pytest.raises(KerasFileError, match='does not exist'):
        read_keras_weights(moved)
    (moved / 'checkpoint').write_text('model_checkpoint_path: "/elsewhere/cp.ckpt"\n')
    assert read_keras_weights(moved).layers.keys() == reads[0].layers.keys()


@pytest.mark.keras
def test_convert_writes_a_saved_model_directory(flat, tmp_path, capsys):
    out = tmp_path / 'converted'
    assert cli.main(['convert', str(flat['files']['saved_model']), '-o', str(out)]) == 0
    model = load_model(out).eval()
    assert model.num_classes == NUM_CLASSES
    with torch.no_grad():
        ours = model(_images(224)).numpy()
    assert np.abs(ours - flat['outputs'][224]).max() <= parity_tolerance(flat['outputs'][224])
    metadata = read_weights_metadata(out / 'model.safetensors')
    assert metadata['source_format'] == 'saved_model' and metadata['source_file'] == 'saved_model'
    assert re.fullmatch('[0-9a-f]{64}', metadata['source_sha256'])  # of the index, data shard and protos


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.parametrize('which', ['flat_checkpoint', 'nested_checkpoint', 'saved_model'])
def test_verify_loads_tf_formats_with_keras2(flat, nested, which, tmp_path, capsys):
    source = {'flat_checkpoint': flat['files']['model_checkpoint'], 'saved_model': nested['files']['saved_model'],
              'nested_checkpoint': nested['files']['tf_checkpoint']}[which]
    assert cli.main(['convert', str(source), '-o', str(tmp_path / 'out'), '--verify']) == 0
    printed = capsys.readouterr().out
    assert 'verify: max |keras - timm| over the logits' in printed and 'PASS' in printed, printed


@pytest.mark.keras
def test_verify_without_tf_keras_says_what_it_needs(flat, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__('sys').modules, 'tf_keras', None)  # `import tf_keras` now fails
    assert cli.main(['convert', str(flat['files']['tf_checkpoint']), '-o', str(tmp_path / 'out'), '--verify']) == 2
    error = capsys.readouterr().err
    assert 'tf-keras' in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


# --- damaged and foreign files ---

def _link_checkpoint(prefix: Path, into: Path) -> Path:
    """A copy of a checkpoint made of symlinks, whose files a test then replaces one by one."""
    into.mkdir(parents=True, exist_ok=True)
    for path in prefix.parent.glob(f'{prefix.name}.*'):
        (into / path.name).symlink_to(path)
    return into / prefix.name


def _replace(link: Path, data: bytes) -> None:
    link.unlink()
    link.write_bytes(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _write_table(entries: List[Tuple[bytes, bytes]]) -> bytes:
    """A LevelDB SSTable as TensorFlow's table builder writes one: a data block, an index block, the footer."""
    def block(items: List[Tuple[bytes, bytes]]) -> bytes:
        body, restarts = b'', []
        for key, value in items:  # a restart point at every entry: no shared key prefixes
            restarts.append(len(body))
            body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
        body += b''.join(struct.pack('<I', r) for r in restarts) + struct.pack('<I', len(restarts))
        return body

    def with_trailer(body: bytes) -> bytes:
        return body + b'\x00' + struct.pack('<I', masked_crc32c(crc32c(body + b'\x00')))

    data = block(sorted(entries))
    meta = block([])
    index = block([(sorted(entries)[-1][0] + b'\xff', _varint(0) + _varint(len(data)))])
    out = with_trailer(data)
    meta_handle = _varint(len(out)) + _varint(len(meta))
    out += with_trailer(meta)
    index_handle = _varint(len(out)) + _varint(len(index))
    out += with_trailer(index)
    footer = (meta_handle + index_handle).ljust(40, b'\x00') + struct.pack('<Q', 0xDB4775248B80FB57)
    return out + footer


def _rewrite_entry(prefix: Path, key: str, **changes: Any) -> None:
    """Rewrite the index at `prefix` with one BundleEntryProto changed (dtype, offset, size, shape, crc32c)."""
    from tensorflow.core.protobuf import tensor_bundle_pb2  # the real proto, to write what TensorFlow would

    table = tf_checkpoint._read_table(Path(f'{prefix}.index'), 'test')
    entry = tensor_bundle_pb2.BundleEntryProto.FromString(table[key.encode()])
    shape = changes.pop('shape', None)
    if shape is not None:
        del entry.shape.dim[:]
        for size in shape:
            entry.shape.dim.add(size=size)
    for name, value in changes.items():
        setattr(entry, name, value)
    table[key.encode()] = entry.SerializeToString()
    _replace(Path(f'{prefix}.index'), _write_table(list(table.items())))


KERNEL = 'layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE'  # conv1_conv/kernel


def _refused(source: Any, tmp_path: Path, *fragments: str) -> str:
    """convert refuses `source` with one line naming all `fragments`, exit code 2, and writes nothing."""
    out = tmp_path / 'out'
    with pytest.raises(KerasFileError) as info:
        convert_to_dir(source, out)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    return message


@pytest.mark.keras
def test_our_table_writer_round_trips(flat, tmp_path):
    """Control for the tests below: the index rewritten with nothing changed still converts."""
    prefix = _link_checkpoint(flat['files']['tf_checkpoint'], tmp_path / 'ck')
    _rewrite_entry(prefix, KERNEL)
    assert convert_keras(prefix).num_classes == NUM_CLASSES


@pytest.mark.keras
@pytest.mark.parametrize('damage, fragments', [
    ('missing_shard', ["tensor '", 'cp.ckpt.data-00000-of-00001 is missing']),
    ('truncated_shard', ['past the end of cp.ckpt.data-00000-of-00001', 'truncated']),
    ('flipped_byte', ['tensor', 'crc32c mismatch in cp.ckpt.data-00000-of-00001']),
    ('flipped_index_byte', ['cp.ckpt.index', 'crc32c mismatch in the block']),
    ('truncated_index', ['cp.ckpt.index', 'not a TensorFlow checkpoint index']),
    ('offset_past_end', [KERNEL, '(conv1_conv/kernel)', 'past the end of cp.ckpt.data-00000-of-00001']),
    ('absurd_size', [KERNEL, 'the index says 1125899906842624']),
    ('absurd_shape', [KERNEL, 'declares shape (1099511627776, 1099511627776)']),
    ('negative_dim', [KERNEL, 'shape (-1,']),
    ('int_dtype', [KERNEL, 'has dtype int32; expected floating point weights']),
    ('crc_in_index', [KERNEL, 'crc32c mismatch']),
    ('shard_out_of_range', [KERNEL, 'data shard 3']),
])
def test_damaged_checkpoints_are_refused_naming_the_tensor(flat, tmp_path, damage, fragments):
    prefix = _link_checkpoint(flat['files']['tf_checkpoint'], tmp_path / 'ck')
    shard = Path(f'{prefix}.data-00000-of-00001')
    index = Path(f'{prefix}.index')
    if damage == 'missing_shard':
        shard.unlink()
    elif damage == 'truncated_shard':
        _replace(shard, shard.read_bytes()[:-1000])
    elif damage == 'flipped_byte':
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        _replace(shard, bytes(data))
    elif damage == 'flipped_index_byte':
        data = bytearray(index.read_bytes())
        data[100] ^= 0x01
        _replace(index, bytes(data))
    elif damage == 'truncated_index':
        _replace(index, index.read_bytes()[:-10])
    elif damage == 'offset_past_end':
        _rewrite_entry(prefix, KERNEL, offset=shard.stat().st_size - 100)
    elif damage == 'absurd_size':
        _rewrite_entry(prefix, KERNEL, size=1 << 50)
    elif damage == 'absurd_shape':
        _rewrite_entry(prefix, KERNEL, shape=(1 << 40, 1 << 40))
    elif damage == 'negative_dim':
        _rewrite_entry(prefix, KERNEL, shape=(-1, 7, 3, 64))
    elif damage == 'int_dtype':
        _rewrite_entry(prefix, KERNEL, dtype=3)
    elif damage == 'crc_in_index':
        table = tf_checkpoint._read_table(index, 'test')
        from tensorflow.core.protobuf import tensor_bundle_pb2

        crc = tensor_bundle_pb2.BundleEntryProto.FromString(table[KERNEL.encode()]).crc32c
        _rewrite_entry(prefix, KERNEL, crc32c=crc ^ 1)
    elif damage == 'shard_out_of_range':
        _rewrite_entry(prefix, KERNEL, shard_id=3)
    message = _refused(prefix, tmp_path, str(prefix), *fragments)
    assert len(message.splitlines()) == 1


@pytest.mark.keras
def test_a_damaged_checkpoint_is_one_line_and_exit_2_on_the_command_line(flat, tmp_path, capsys):
    prefix = _link_checkpoint(flat['files']['tf_checkpoint'], tmp_path / 'ck')
    Path(f'{prefix}.data-00000-of-00001').unlink()
    assert cli.main(['convert', str(prefix), '-o', str(tmp_path / 'out')]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and 'Traceback' not in captured.err
    assert 'is missing' in captured.err and not (tmp_path / 'out').exists()


@pytest.mark.keras
def test_a_tf_train_checkpoint_of_other_objects_is_refused(tf_keras, tmp_path):
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(step=tf.Variable(3), weights=tf.Variable(np.ones((3, 3), np.float32)))
    prefix = checkpoint.write(str(tmp_path / 'other' / 'ckpt'))
    _refused(prefix, tmp_path, 'not a Keras model checkpoint', "['step', 'weights']")


@pytest.mark.keras
def test_a_keras_model_inside_a_tf_train_checkpoint_is_read(tf_keras, flat, tmp_path):
    """`tf.train.Checkpoint(model=model, optimizer=...)`, the custom training loop pattern: the model inside."""
    import tensorflow as tf

    model = tf_keras.applications.ResNet50V2(weights=None, classes=NUM_CLASSES, classifier_activation=None)
    model.load_weights(flat['files']['weights_h5'])
    prefix = tf.train.Checkpoint(model=model, step=tf.Variable(1)).write(str(tmp_path / 'loop' / 'ckpt'))
    assert convert_keras(prefix).num_classes == NUM_CLASSES


@pytest.mark.keras
@pytest.mark.slow
def test_a_saved_model_of_another_architecture_is_refused(tf_keras, tmp_path):
    inputs = tf_keras.Input((32, 32, 3))
    x = tf_keras.layers.Conv2D(8, 3, name='stem')(inputs)
    outputs = tf_keras.layers.Dense(4, name='logits')(tf_keras.layers.GlobalAveragePooling2D()(x))
    tf_keras.Model(inputs, outputs).save(tmp_path / 'small_cnn')
    _refused(tmp_path / 'small_cnn', tmp_path, 'small_cnn is not a Keras ResNet', 'found stem, logits')


@pytest.mark.keras
def test_other_nested_heads_are_refused_with_the_fix(tf_keras, tmp_path):
    inputs = tf_keras.Input((None, None, 3))
    base = tf_keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(None, None, 3))
    pooled = tf_keras.layers.GlobalAveragePooling2D()(base(inputs))
    two_dense = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(tf_keras.layers.Dense(16)(pooled)))
    two_dense.save_weights(str(tmp_path / 'two' / 'cp.ckpt'))
    _refused(tmp_path / 'two', tmp_path, 'nested model', 'include_top=True', '.keras file')
    with_top = tf_keras.applications.ResNet50V2(weights=None, classes=5)
    nested_top = tf_keras.Model(inputs, tf_keras.layers.Dense(2)(with_top(tf_keras.layers.Resizing(224, 224)(inputs))))
    nested_top.save_weights(str(tmp_path / 'nested_top' / 'cp.ckpt'))
    _refused(tmp_path / 'nested_top', tmp_path, 'already has its classifier "predictions"')


def _edit_metadata(saved_model: Path, into: Path, edit: Any) -> Path:
    """A copy of a SavedModel whose keras_metadata.pb is edited by `edit(node_path, metadata) -> metadata`."""
    from tf_keras.protobuf import saved_metadata_pb2

    into.mkdir()
    for path in saved_model.iterdir():
        (into / path.name).symlink_to(path)
    metadata = saved_metadata_pb2.SavedMetadata.FromString((saved_model / 'keras_metadata.pb').read_bytes())
    for node in metadata.nodes:
        node.metadata = json.dumps(edit(node.node_path, json.loads(node.metadata)))
    _replace(into / 'keras_metadata.pb', metadata.SerializeToString())
    return into


@pytest.mark.keras
def test_saved_model_metadata_must_prove_the_nested_structure(nested, tmp_path):
    def max_pooling(path: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
        return json.loads(json.dumps(metadata).replace('"GlobalAveragePooling2D"', '"GlobalMaxPooling2D"'))

    edited = _edit_metadata(nested['files']['saved_model'], tmp_path / 'max_pool', max_pooling)
    _refused(edited, tmp_path, 'GlobalMaxPooling2D', 'not a ResNetV2 base, global average pooling and a Dense')


@pytest.mark.keras
def test_saved_model_with_another_batchnorm_epsilon_is_refused(flat, tmp_path):
    def epsilon(path: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
        if metadata.get('name') == 'post_bn':
            metadata['config']['epsilon'] = 0.001
        return metadata

    edited = _edit_metadata(flat['files']['saved_model'], tmp_path / 'eps', epsilon)
    _refused(edited, tmp_path, "layer 'post_bn'", 'epsilon 0.001', 'exactly')


def test_hostile_object_graphs_are_refused():
    """A cycle, and a graph whose paths multiply (2**32 of them over 32 levels): refused, not walked."""
    nodes = [tf_checkpoint._Node([(1, 'layer_with_weights-0')]), tf_checkpoint._Node([(0, 'layer_with_weights-0')])]
    with pytest.raises(KerasFileError, match='reached twice|nested more than'):
        tf_checkpoint._model_layers(nodes, 0, 'test')
    levels = 30  # under the depth limit: the paths multiply, the walk must not
    nodes = [tf_checkpoint._Node([(1, 'layer_with_weights-0'), (2, 'layer_with_weights-1')])]
    for level in range(levels):
        below = [1 + 2 * (level + 1), 2 + 2 * (level + 1)] if level < levels - 1 else []
        children = [(child, f'layer_with_weights-{i}') for i, child in enumerate(below)]
        nodes += [tf_checkpoint._Node(children), tf_checkpoint._Node(children)]
    with pytest.raises(KerasFileError, match='reached twice'):
        tf_checkpoint._model_layers(nodes, 0, 'test')


def test_a_folder_that_is_no_tf_format_is_still_a_directory_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(KerasFileError, match='is a directory'):
        read_keras_weights(tmp_path / 'empty')
    (tmp_path / 'junk.index').write_bytes(os.urandom(100))
    with pytest.raises(KerasFileError, match='not a TensorFlow checkpoint index'):
        read_keras_weights(tmp_path / 'junk.index')
    (tmp_path / 'ck').mkdir()
    (tmp_path / 'ck' / 'cp.ckpt.index').write_bytes(b'')
    with pytest.raises(KerasFileError, match=r'no `checkpoint` file .* name one by its prefix \(e.g. .*ck/cp.ckpt\)'):
        read_keras_weights(tmp_path / 'ck')
    (tmp_path / 'ck' / 'checkpoint').write_text('all_model_checkpoint_paths: "x"\n')
    with pytest.raises(KerasFileError, match='names no model_checkpoint_path'):
        read_keras_weights(tmp_path / 'ck')
