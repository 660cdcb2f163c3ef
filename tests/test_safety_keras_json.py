"""Hostile `.keras` JSON (issue 9, item 8): config.json and metadata.json are parsed within limits and every value
used is type-checked, so that each bad shape is one `KerasFileError` naming the member and the key path, never
a `RecursionError`, `AttributeError`, `KeyError` or `TypeError`.

The control is a small nested model written by Keras itself; its weights are read back from the archive as
Keras wrote it and, with the layer names stripped from `model.weights.h5` as Keras < 3.6 wrote it, named from
config.json alone, which is the path that hostile JSON reaches.
"""
import copy
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnetv2_zoo  # noqa: F401  (imports torch and timm before Keras)
from resnetv2_zoo.errors import KerasFileError
from resnetv2_zoo.keras.files import read_keras_weights
from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.keras.safe_json import MAX_JSON_DEPTH, json_depth

pytestmark = pytest.mark.keras

BACKBONE = 1  # config.layers[1] is the nested model, whose layers are the input, `conv` and `bn`
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Archive:
    """A Keras-written `.keras` whose JSON members a test replaces, then reads back."""

    def __init__(self, path: Path, expected: Dict[str, Dict[str, np.ndarray]]):
        self.path = path
        self.expected = expected
        with zipfile.ZipFile(path) as archive:
            self.members = {name: archive.read(name) for name in archive.namelist()}
        self.config = json.loads(self.members['config.json'])
        self.metadata = json.loads(self.members['metadata.json'])

    def write(self, out: Path, **members: Any) -> Path:
        """`out` with members replaced: bytes as they are, anything else as JSON; None drops the member."""
        with zipfile.ZipFile(out, 'w') as archive:
            for name, data in self.members.items():
                key = name.replace('.', '_')
                if key in members:
                    data = members[key]
                    if data is None:
                        continue
                    if not isinstance(data, bytes):
                        data = json.dumps(data).encode()
                archive.writestr(name, data)
        return out


@pytest.fixture(scope='module')
def archives(tmp_path_factory) -> Tuple[Archive, Archive]:
    """(as Keras wrote it, without layer names in model.weights.h5): a classifier around a nested backbone."""
    keras = import_keras()
    out = tmp_path_factory.mktemp('keras_json')
    image = keras.Input((8, 8, 3), name='image')
    features = keras.layers.BatchNormalization(name='bn')(keras.layers.Conv2D(4, 3, name='conv')(image))
    backbone = keras.Model(image, features, name='backbone')
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, name='fc')(keras.layers.GlobalAveragePooling2D(name='pool')(backbone(inputs)))
    model = keras.Model(inputs, outputs, name='classifier')
    rng = np.random.default_rng(0)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
    expected = {'conv': dict(zip(('kernel', 'bias'), model.get_layer('backbone').get_layer('conv').get_weights())),
                'bn': dict(zip(('gamma', 'beta', 'moving_mean', 'moving_variance'),
                               model.get_layer('backbone').get_layer('bn').get_weights())),
                'fc': dict(zip(('kernel', 'bias'), model.get_layer('fc').get_weights()))}
    model.save(out / 'model.keras')
    named = Archive(out / 'model.keras', expected)
    return named, Archive(named.write(out / 'nameless.keras', model_weights_h5=_without_names(named)), expected)


def _without_names(archive: 'Archive') -> bytes:
    """model.weights.h5 as Keras < 3.6 wrote it: no `name` attribute on any `vars` group, nested ones included."""
    buffer = io.BytesIO(archive.members['model.weights.h5'])
    with h5py.File(buffer, 'a') as h5:
        groups = []
        h5.visititems(lambda name, obj: groups.append(obj) if name.endswith('vars') else None)
        for group in groups:
            del group.attrs['name']
    return buffer.getvalue()


def _assert_reads(path: Path, expected: Dict[str, Dict[str, np.ndarray]]) -> None:
    weights = read_keras_weights(path)
    assert sorted(weights.layers) == sorted(expected)
    for layer, variables in expected.items():
        assert sorted(weights.layers[layer]) == sorted(variables)
        assert all(np.array_equal(weights.layers[layer][k], v) for k, v in variables.items())


def test_keras_written_archives_read_exactly(archives, tmp_path):
    """The control: both archives read as written, and JSON rewritten unchanged reads the same."""
    named, nameless = archives
    for archive in archives:
        _assert_reads(archive.path, archive.expected)
        copy_path = archive.write(tmp_path / 'copy.keras', config_json=archive.config, metadata_json=archive.metadata)
        _assert_reads(copy_path, archive.expected)
    assert read_keras_weights(named.path).keras_version == named.metadata['keras_version']
    depth = json_depth(named.members['config.json'].decode())  # measured on the text, before parsing
    assert depth == _nesting(named.config) and 10 <= depth <= MAX_JSON_DEPTH


def _nesting(value: Any) -> int:
    """Nesting depth of a parsed JSON value, the slow obvious way."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_nesting, children), default=0)


def test_nameless_weights_need_the_config(archives, tmp_path):
    """Control for the cases below: without config.json, the stripped archive cannot be named at all."""
    nameless = archives[1]
    with pytest.raises(KerasFileError, match='without layer names and without a config'):
        read_keras_weights(nameless.write(tmp_path / 'x.keras', config_json=None))


def _layer(config: Dict, *indices: int) -> Dict:
    """The layer at config.layers[i].config.layers[j]... of a config."""
    for index in indices:
        config = config['config']['layers'][index]
    return config


def _edit(edit):
    def apply(archive: Archive) -> Dict:
        config = copy.deepcopy(archive.config)
        edit(config)
        return config
    return apply


def _set(*indices: int, key: str, value: Any, inner: bool = False):
    def edit(config):
        layer = _layer(config, *indices)
        (layer['config'] if inner else layer)[key] = value
    return _edit(edit)


def _deep(depth: int) -> bytes:
    return b'{"config": ' + b'[' * (depth - 1) + b']' * (depth - 1) + b'}'


# (id, config.json or a function of the archive giving it, metadata.json, the member and key path in the message,
# the problem). The 'old' column of the note: each of these raised the error named in the id's comment.
HOSTILE: List[Tuple[str, Any, Any, str, str]] = [
    # RecursionError before
    ('deep_100000', _deep(100_000), None, 'config.json', 'is nested 100000 levels deep, over the limit of 64'),
    ('deep_65', _deep(65), None, 'config.json', 'is nested 65 levels deep, over the limit of 64'),
    # AttributeError before
    ('config_is_a_list', {'config': []}, None, 'config.json: config', 'expected an object, found a list'),
    ('metadata_is_a_list', None, [], 'metadata.json: top level', 'expected an object, found a list'),
    # silently ignored or TypeError / KeyError before
    ('top_level_is_a_list', [], None, 'config.json: top level', 'expected an object, found a list'),
    ('layers_is_an_object', _edit(lambda c: c['config'].update(layers={})), None, 'config.json: config.layers',
     'expected a list, found an object'),
    ('layer_is_a_number', _edit(lambda c: c['config']['layers'].__setitem__(2, 5)), None,
     'config.json: config.layers[2]', 'expected an object, found an integer'),
    ('nested_layer_config_is_a_list', _set(BACKBONE, 1, key='config', value=[]), None,
     'config.json: config.layers[1].config.layers[1].config', 'expected an object, found a list'),
    ('nested_layers_is_a_string', _set(BACKBONE, key='layers', value='conv', inner=True), None,
     'config.json: config.layers[1].config.layers', 'expected a list, found a string'),
    ('class_name_missing', _edit(lambda c: _layer(c, 3).pop('class_name')), None, 'config.json: config.layers[3]',
     "missing key 'class_name'"),
    ('class_name_null', _set(3, key='class_name', value=None), None, 'config.json: config.layers[3].class_name',
     'expected a string, found null'),
    ('layer_name_a_number', _set(BACKBONE, 2, key='name', value=7, inner=True), None,
     'config.json: config.layers[1].config.layers[2].config.name', 'expected a string, found an integer'),
    ('layer_name_true', _set(3, key='name', value=True, inner=True), None, 'config.json: config.layers[3].config.name',
     'expected a string, found true'),
    ('keras_version_a_number', None, {'keras_version': 3}, 'metadata.json: keras_version',
     'expected a string, found an integer'),
    # ValueError / UnicodeDecodeError messages before, now naming the member
    ('not_json', b'{"config": ', None, 'config.json', 'is not valid JSON (a damaged .keras archive): JSONDecodeError'),
    ('huge_integer', b'{"n": ' + b'9' * 5000 + b'}', None, 'config.json', 'is not valid JSON'),
    ('not_utf8', b'{"name": "\xff"}', None, 'config.json', 'is not UTF-8 text'),
    ('metadata_deep', None, b'[' * 70 + b']' * 70, 'metadata.json', 'is nested 70 levels deep'),
]


@pytest.mark.parametrize('config, metadata, where, problem', [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
def test_hostile_json_is_one_clear_error(archives, tmp_path, config, metadata, where, problem):
    for archive in archives:  # the same refusal whether or not the weights carry their names: checked before use
        members = {}
        if config is not None:
            members['config_json'] = config(archive) if callable(config) else config
        if metadata is not None:
            members['metadata_json'] = metadata
        path = archive.write(tmp_path / 'model.keras', **members)
        with pytest.raises(KerasFileError) as info:
            read_keras_weights(path)
        assert str(info.value).startswith(f'{path}: {where}'), str(info.value)
        assert problem in str(info.value)


def test_depth_at_the_limit_is_parsed(archives, tmp_path):
    """Control for the depth cases: 64 levels are parsed, and the shape check then names the key path."""
    path = archives[0].write(tmp_path / 'model.keras', config_json=_deep(64))
    with pytest.raises(KerasFileError, match=r'config\.json: config: expected an object, found a list'):
        read_keras_weights(path)


# --- fuzzing: any JSON anywhere in a Keras config, and any bytes ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)


def _paths(value: Any, path: Tuple = ()) -> List[Tuple]:
    """Every key path into `value` (tuples of keys and indices), containers and leaves."""
    paths = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _paths(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += _paths(child, path + (index,))
    return paths


def _replaced(value: Any, path: Tuple, new: Any) -> Any:
    if not path:
        return new
    value = copy.deepcopy(value)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return value


def _reads_or_refuses(path: Path) -> None:
    try:
        read_keras_weights(path)
    except KerasFileError as e:
        assert str(e).startswith(str(path)), str(e)


@FUZZ
@given(data=st.data(), new=JSON_VALUES)
def test_any_json_value_anywhere_reads_or_is_refused(archives, tmp_path, data, new):
    archive = archives[1]  # names come from config.json
    member = data.draw(st.sampled_from(['config_json', 'metadata_json']))
    document = archive.config if member == 'config_json' else archive.metadata
    where = data.draw(st.sampled_from(_paths(document)))
    _reads_or_refuses(archive.write(tmp_path / 'model.keras', **{member: _replaced(document, where, new)}))


@FUZZ
@given(text=st.text(alphabet='[]{}",:0 a\\', max_size=300) | st.binary(max_size=200),
       member=st.sampled_from(['config_json', 'metadata_json']))
def test_any_bytes_read_or_are_refused(archives, tmp_path, text, member):
    data = text.encode() if isinstance(text, str) else text
    _reads_or_refuses(archives[1].write(tmp_path / 'model.keras', **{member: data}))


@FUZZ
@given(depth=st.integers(0, 3000), opener=st.sampled_from(['[', '{"a":']))
def test_any_depth_reads_or_is_refused_without_recursion_error(archives, tmp_path, depth, opener):
    closer = ']' if opener == '[' else '}'
    data = ('{"config": ' + opener * depth + '1' + closer * depth + '}').encode()
    path = archives[1].write(tmp_path / 'model.keras', config_json=data)
    if depth + 1 > MAX_JSON_DEPTH:
        with pytest.raises(KerasFileError, match=f'config.json is nested {depth + 1} levels deep'):
            read_keras_weights(path)
    else:
        _reads_or_refuses(path)
