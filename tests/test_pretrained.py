"""`pretrained=True`: package cache, Keras cache, download (from a local server), offline, concurrency, no TensorFlow.

A Keras-written ResNet50V2 with seeded random weights (conftest's session model) stands in for the official
files (their MD5s patched in); Keras's own outputs on a seeded batch are the reference, so every test here
is marked `keras`. Nothing touches the internet: the download URL points at a closed local port unless a
test starts its server.
"""
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import json
import re
import shlex
import shutil
import threading
from pathlib import Path
from typing import Iterator, List, NamedTuple, Tuple

import numpy as np
import pytest
import timm
import torch
from children import python_child, run_python

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo import cli
from resnetv2_zoo.errors import WeightsUnavailableError
from resnetv2_zoo.keras.spec import KERAS_RESNETS
from resnetv2_zoo.weights import pretrained
from resnetv2_zoo.weights.checkpoint import save_model_dir
from resnetv2_zoo.weights.convert import convert_to_dir
from resnetv2_zoo.weights.verify import parity_tolerance

ARCH = 'resnet50v2_keras'
TOP_FILE = 'resnet50v2_weights_tf_dim_ordering_tf_kernels.h5'
NOTOP_FILE = 'resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5'
CONVERTED = f'{ARCH}.tf_in1k'
NUM_PROCESSES = 4  # racing for one empty cache: more would only repeat the race

pytestmark = pytest.mark.keras

# Child preamble: every import of TensorFlow or Keras fails, and is recorded. Probes that only look for
# them (torch._dynamo calls importlib.util.find_spec on import) are answered without an origin, as for
# a namespace package, so that they go on; executing the module is what fails.
_BLOCK_TENSORFLOW = '''
import importlib.abc
import importlib.util
import sys

BLOCKED_IMPORTS = []


class _BlockTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        BLOCKED_IMPORTS.append(spec.name)
        raise ImportError(f'{spec.name} is blocked in this test')

    def exec_module(self, module):
        raise AssertionError('unreachable: create_module raises')


sys.meta_path.insert(0, _BlockTensorFlow())
try:
    import keras  # noqa: F401
except ImportError:
    BLOCKED_IMPORTS.clear()
else:
    raise SystemExit('the import blocker does not work')


def check_no_tensorflow():
    assert not BLOCKED_IMPORTS, f'tried to import {BLOCKED_IMPORTS}'
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))
    assert not loaded, loaded
'''

# Child: wait for the start signal, then create_model(pretrained=True) and save its logits.
_CONCURRENT_CHILD = _BLOCK_TENSORFLOW + '''
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch

from resnetv2_zoo.weights import pretrained

md5s, x_path, out, go = sys.argv[1:]
import dataclasses
from resnetv2_zoo.keras.spec import KERAS_RESNETS
spec = KERAS_RESNETS['resnet50v2_keras']
KERAS_RESNETS[spec.arch] = dataclasses.replace(spec, weights_md5=tuple(json.loads(md5s)))
x = torch.from_numpy(np.load(x_path))
print('ready', flush=True)
while not Path(go).exists():
    time.sleep(0.005)
model = timm.create_model('resnet50v2_keras', pretrained=True).eval()
with torch.no_grad():
    np.save(out, model(x).numpy())
check_no_tensorflow()
'''

# Child: pretrained=True from a Keras-cache h5 (converting it), then from the package cache alone.
_NO_TENSORFLOW_CHILD = _BLOCK_TENSORFLOW + '''
import json
from pathlib import Path

import numpy as np
import timm
import torch

from resnetv2_zoo.weights import pretrained

md5s, x_path, out = sys.argv[1:]
import dataclasses
from resnetv2_zoo.keras.spec import KERAS_RESNETS
spec = KERAS_RESNETS['resnet50v2_keras']
KERAS_RESNETS[spec.arch] = dataclasses.replace(spec, weights_md5=tuple(json.loads(md5s)))
x = torch.from_numpy(np.load(x_path))
logits = {}
with torch.no_grad():
    logits['keras_cache'] = timm.create_model('resnet50v2_keras', pretrained=True).eval()(x).numpy()
    for h5 in pretrained.keras_cache_dir().iterdir():
        h5.unlink()
    logits['package_cache'] = timm.create_model('resnet50v2_keras', pretrained=True).eval()(x).numpy()
np.savez(out, **logits)
check_no_tensorflow()
'''


class KerasFiles(NamedTuple):
    dir: Path
    md5s: Tuple[str, str]  # (with top, without top), as in KerasResNet.weights_md5
    x: torch.Tensor
    logits: np.ndarray
    features: np.ndarray  # no top, pooling='avg'


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_keras_close(ours, keras: np.ndarray) -> None:
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == keras.shape
    assert np.abs(ours - keras).max() <= parity_tolerance(keras)


@pytest.fixture(scope='session')
def keras_files(keras_resnet50v2, tmp_path_factory) -> KerasFiles:
    """The official files' stand-ins (the session's ResNet50V2 as Keras 2 `.h5` weights, written by Keras,
    with and without the top) and Keras's outputs on a seeded 64 px batch."""
    out = tmp_path_factory.mktemp('keras_files')
    for include_top, file_name in ((True, TOP_FILE), (False, NOTOP_FILE)):
        shutil.copyfile(keras_resnet50v2.file(include_top, 'legacy_h5_weights'), out / file_name)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    outputs = keras_resnet50v2.outputs(x)
    np.save(out / 'x.npy', x)
    return KerasFiles(out, (_md5(out / TOP_FILE), _md5(out / NOTOP_FILE)), torch.from_numpy(x), outputs['logits'],
                      outputs['avg'])


@pytest.fixture
def caches(tmp_path, monkeypatch, keras_files) -> Path:
    """Empty package and Keras caches, online, the download URL on a closed port, the test files' MD5s."""
    cache = tmp_path / 'cache'
    monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(cache))
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
    monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', 'http://127.0.0.1:9/')
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.delenv('RESNETV2_ZOO_OFFLINE', raising=False)
    set_official_md5s(monkeypatch, keras_files.md5s)
    (tmp_path / 'keras' / 'models').mkdir(parents=True)
    return cache


@contextlib.contextmanager
def _serve(directory: Path, handler: type = http.server.SimpleHTTPRequestHandler) -> Iterator[Tuple[str, List[str]]]:
    """An HTTP server on 127.0.0.1 (random port) serving `directory` with `handler`; yields its URL and the paths
    requested (a `handler` that stalls or cuts the connection short makes the faults of test_safety_pretrained.py)."""
    requests: List[str] = []

    class Handler(handler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}/', requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(caches, keras_files, monkeypatch) -> Iterator[List[str]]:
    """The download URL served from the Keras files; yields the paths requested."""
    with _serve(keras_files.dir) as (url, requests):
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        yield requests


def _put_in_keras_cache(keras_files: KerasFiles, file_name: str) -> Path:
    dst = pretrained.keras_cache_dir() / file_name
    dst.write_bytes((keras_files.dir / file_name).read_bytes())
    return dst


def _cache_entries(cache: Path) -> List[str]:
    """Everything in the package cache but lock files (filelock leaves them, empty, by design)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob('*') if p.suffix != '.lock')


def _converted_files(name: str = CONVERTED) -> List[str]:
    return [name, f'{name}/README.md', f'{name}/config.json', f'{name}/model.safetensors']  # README.md: its model card


def _forward(x: torch.Tensor, **kwargs):
    model = timm.create_model(ARCH, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        return model(x)


def test_download_verify_convert_cache(caches, server, keras_files, capfd):
    assert_keras_close(_forward(keras_files.x), keras_files.logits)
    assert server == [f'/{TOP_FILE}']
    assert '100%' in capfd.readouterr().err  # the progress bar
    assert _cache_entries(caches) == _converted_files()
    config = json.loads((caches / CONVERTED / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 1000
    assert config['label_names'][:2] == ['n01440764', 'n01443537']


def test_second_call_uses_cache_with_server_stopped(caches, keras_files, monkeypatch):
    with _serve(keras_files.dir) as (url, requests):
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        first = _forward(keras_files.x)
    assert requests == [f'/{TOP_FILE}']
    assert torch.equal(_forward(keras_files.x), first)  # the server is gone: its port refuses connections


def test_wrong_md5_is_rejected_and_nothing_cached(caches, server, keras_files, monkeypatch):
    set_official_md5s(monkeypatch, ('0' * 32, '0' * 32))
    with pytest.raises(WeightsUnavailableError, match=f'MD5 {keras_files.md5s[0]}, expected 0{{32}}'):
        timm.create_model(ARCH, pretrained=True)
    assert server == [f'/{TOP_FILE}']
    assert _cache_entries(caches) == []
    assert list(pretrained.keras_cache_dir().iterdir()) == []


def test_headless_request_downloads_the_notop_file(caches, server, keras_files):
    assert_keras_close(_forward(keras_files.x, num_classes=0), keras_files.features)
    assert server == [f'/{NOTOP_FILE}']
    assert _cache_entries(caches) == _converted_files(f'{CONVERTED}-notop')


def test_keras_cache(caches, keras_files):
    _put_in_keras_cache(keras_files, TOP_FILE)
    assert_keras_close(_forward(keras_files.x), keras_files.logits)  # downloading would fail: closed port
    assert _cache_entries(caches) == _converted_files()


def test_keras_cache_notop_file_serves_headless_models_only(caches, keras_files, monkeypatch):
    """A Keras user who ran ResNet50V2(include_top=False, weights='imagenet') has only the `_notop` file."""
    _put_in_keras_cache(keras_files, NOTOP_FILE)
    monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
    assert_keras_close(_forward(keras_files.x, num_classes=0), keras_files.features)
    head4 = timm.create_model(ARCH, pretrained=True, num_classes=4)
    assert head4.pretrained_cfg['num_classes'] == 0 and 'label_names' not in head4.pretrained_cfg
    with pytest.raises(WeightsUnavailableError, match=f'no .*{TOP_FILE}'):
        timm.create_model(ARCH, pretrained=True)


def test_keras_cache_file_with_wrong_md5_is_ignored(caches, keras_files, monkeypatch):
    bad = _put_in_keras_cache(keras_files, TOP_FILE)
    set_official_md5s(monkeypatch, ('f' * 32, keras_files.md5s[1]))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(WeightsUnavailableError, match=f'{bad} has MD5 {keras_files.md5s[0]}, expected f{{32}}'):
        timm.create_model(ARCH, pretrained=True)
    assert _cache_entries(caches) == []


def test_pretrained_cfg_overlay_file_comes_first(caches, tmp_path):
    torch.manual_seed(0)
    mine = timm.create_model(ARCH).eval()
    weights = save_model_dir(mine, tmp_path / 'mine') / 'model.safetensors'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = mine(x)
    assert torch.equal(_forward(x, pretrained_cfg_overlay=dict(file=str(weights))), expected)
    local_dir = timm.create_model(f'local-dir:{weights.parent}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(local_dir(x), expected)
    assert not caches.exists()


@pytest.mark.parametrize('switch', ['HF_HUB_OFFLINE', 'RESNETV2_ZOO_OFFLINE'])
def test_offline_with_nothing_cached(caches, server, monkeypatch, switch):
    monkeypatch.setenv(switch, '1')
    with pytest.raises(WeightsUnavailableError) as info:
        timm.create_model(ARCH, pretrained=True)
    message = str(info.value)
    assert 'downloads are off' in message and f'no {pretrained.keras_cache_dir() / TOP_FILE}' in message
    assert f'resnetv2-zoo convert {TOP_FILE} -o {caches / CONVERTED}' in message
    assert server == []


def test_failed_download_says_how_to_convert_by_hand(caches):
    hint = r'download of http://127.0.0.1:9/\S+ failed.*resnetv2-zoo convert'
    with pytest.raises(WeightsUnavailableError, match=hint):
        timm.create_model(ARCH, pretrained=True)
    assert _cache_entries(caches) == []


def test_timm_adaptations_of_pretrained_weights(caches, keras_files):
    _put_in_keras_cache(keras_files, TOP_FILE)
    full = timm.create_model(ARCH, pretrained=True).eval()
    expected = full.state_dict()

    head4 = timm.create_model(ARCH, pretrained=True, num_classes=4)
    assert head4.head.fc.out_features == 4
    assert all(torch.equal(v, expected[k]) for k, v in head4.state_dict().items() if not k.startswith('head.'))

    gray = timm.create_model(ARCH, pretrained=True, in_chans=1)
    assert torch.equal(gray.stem.conv.weight, expected['stem.conv.weight'].sum(dim=1, keepdim=True))

    features = timm.create_model(ARCH, pretrained=True, features_only=True).eval()
    with torch.no_grad():
        maps = features(keras_files.x)
        reference = full.forward_intermediates(keras_files.x, intermediates_only=True)
    assert len(maps) == len(reference) == 5
    assert all(torch.equal(a, b) for a, b in zip(maps, reference))


@pytest.mark.slow
def test_concurrent_processes_convert_once(caches, server, keras_files, tmp_path):
    go = tmp_path / 'go'
    children = []
    try:
        for i in range(NUM_PROCESSES):  # separate processes, forked from the pre-imported forkserver
            children.append(python_child(_CONCURRENT_CHILD, json.dumps(keras_files.md5s),
                                         str(keras_files.dir / 'x.npy'), str(tmp_path / f'logits{i}.npy'), str(go)))
        for child in children:
            assert child.wait_for_stdout('ready\n', 300) == 'ready\n'
        go.touch()  # every child has imported everything and waits: they race for the empty cache from here
        for child in children:
            child.wait(timeout=300)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(60)
    for child in children:
        assert child.returncode == 0, child.read_stderr()[-3000:]
    assert server == [f'/{TOP_FILE}']  # one download, so one conversion
    assert _cache_entries(caches) == _converted_files()
    outputs = [np.load(tmp_path / f'logits{i}.npy') for i in range(NUM_PROCESSES)]
    assert all(np.array_equal(out, outputs[0]) for out in outputs)
    assert_keras_close(outputs[0], keras_files.logits)


@pytest.mark.slow
def test_loading_never_imports_tensorflow(caches, keras_files, tmp_path):
    _put_in_keras_cache(keras_files, TOP_FILE)
    out = tmp_path / 'logits.npz'
    # a child process forked from the forkserver, which imported torch, timm and resnetv2_zoo but not TensorFlow:
    # had any of those imported it, the blocker's own check and `check_no_tensorflow` would fail
    result = run_python(_NO_TENSORFLOW_CHILD, json.dumps(keras_files.md5s), str(keras_files.dir / 'x.npy'), str(out),
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(pretrained.keras_cache_dir().iterdir()) == []  # the second model came from the package cache
    logits = np.load(out)
    assert_keras_close(logits['keras_cache'], keras_files.logits)
    assert_keras_close(logits['package_cache'], keras_files.logits)


def test_decode_predictions_like_keras():
    logits = torch.full((2, 1000), -5.0)
    logits[0, 1], logits[0, 0], logits[1, 999] = 3.0, 2.0, 1.0
    decoded = pretrained.decode_predictions(logits, top=2)
    probs = logits.softmax(dim=1)
    assert [(wnid, round(p, 6)) for wnid, _, p in decoded[0]] == [
        ('n01443537', round(probs[0, 1].item(), 6)), ('n01440764', round(probs[0, 0].item(), 6))]
    assert decoded[0][0][1].startswith('goldfish') and decoded[1][0][0] == 'n15075141'
    assert timm.create_model(ARCH).pretrained_cfg['label_names'][1] == 'n01443537'
    with pytest.raises(ValueError, match=r'\(batch, 1000\), got \(2, 4\)'):
        pretrained.decode_predictions(torch.zeros(2, 4))


def test_hand_conversion_command_in_the_error_works(caches, keras_files, monkeypatch):
    monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
    with pytest.raises(WeightsUnavailableError) as info:
        timm.create_model(ARCH, pretrained=True)
    command = shlex.split(re.search(r'`(resnetv2-zoo convert [^`]+)`', str(info.value))[1])
    monkeypatch.chdir(keras_files.dir)  # where the user downloaded the file to
    assert cli.main(command[1:]) == 0
    assert_keras_close(_forward(keras_files.x), keras_files.logits)


def test_headless_file_in_place_of_the_full_one_is_refused(caches, keras_files):
    caches.mkdir()
    convert_to_dir(keras_files.dir / NOTOP_FILE, caches / CONVERTED)  # a hand conversion of the wrong file
    with pytest.raises(WeightsUnavailableError, match=f'{caches / CONVERTED}.* 0 classes, expected 1000'):
        timm.create_model(ARCH, pretrained=True)


def set_official_md5s(monkeypatch, md5s) -> None:
    """Make `md5s` (with top, without top) the published MD5s of ARCH's official Keras files for this test."""
    monkeypatch.setitem(KERAS_RESNETS, ARCH, dataclasses.replace(KERAS_RESNETS[ARCH], weights_md5=tuple(md5s)))
