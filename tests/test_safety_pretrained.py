"""`pretrained=True` never hangs and never tracebacks on a bad cache: issue 9, items 3 and 4.

Faults, all on 127.0.0.1: a server that sends headers and then nothing, one that accepts and never
answers, one that cuts the body short, a refused connect; a cache lock held by a live process and one
left by a process killed with SIGKILL; caches that cannot be written (a path through a file, a file in
place of the folder, and a folder of another account, by dropping root or by chmod). The Keras file is
written with h5py from a seeded timm model (`write_legacy_h5`), so nothing here needs TensorFlow.
"""
import contextlib
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import timm
import torch
from children import Child, python_child, run_python
from keras_helpers import write_legacy_h5
from test_pretrained import NOTOP_FILE, TOP_FILE, KerasFiles, _cache_entries, _md5, _serve, caches  # noqa: F401

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.errors import ResNetV2ZooError, WeightsUnavailableError
from resnetv2_zoo.train.finetune import create_classifier, finetune_args
from resnetv2_zoo.weights import pretrained

ARCH = 'resnet50v2_keras'
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 2  # RESNETV2_ZOO_DOWNLOAD_TIMEOUT / RESNETV2_ZOO_LOCK_TIMEOUT in the fault tests
BODY_BYTES = 1 << 20  # what the faulty servers promise in Content-Length
SENT_BYTES = 1000  # what they send of it

# The child's preamble: the test's stand-in MD5s become the official ones.
_CHILD_MD5S = '''
import dataclasses, json, sys
from resnetv2_zoo.keras.spec import KERAS_RESNETS
spec = KERAS_RESNETS['resnet50v2_keras']
KERAS_RESNETS[spec.arch] = dataclasses.replace(spec, weights_md5=tuple(json.loads(sys.argv[1])))
'''

# Child: create the model (the lock, download and conversion happen here), report how long it took.
_CREATE_CHILD = _CHILD_MD5S + '''
import time
import timm
from resnetv2_zoo.errors import WeightsUnavailableError
start = time.monotonic()
try:
    timm.create_model('resnet50v2_keras', pretrained=True)
except WeightsUnavailableError as e:
    print(f'error after {time.monotonic() - start:.2f} s: {e}', flush=True)
'''

# Child (another account's cache): build headless from the Keras-cache file, check the weights, name the folder.
_UNWRITABLE_CHILD = _CHILD_MD5S + '''
import os
import timm
import torch
from safetensors.torch import load_file
model = timm.create_model('resnet50v2_keras', pretrained=True, num_classes=0)
reference = load_file(sys.argv[2])
state = {k: v for k, v in model.state_dict().items() if 'num_batches' not in k}
assert sorted(reference) == sorted(state), sorted(set(reference) ^ set(state))
assert all(torch.equal(state[k], v) for k, v in reference.items())
weights = model.pretrained_cfg['file']
assert os.access(weights, os.R_OK)
print('converted into', os.path.dirname(os.path.dirname(weights)), flush=True)
'''


@pytest.fixture(scope='module')
def keras_files(tmp_path_factory) -> KerasFiles:
    """The `_notop` official file's stand-in, a Keras 2 `.h5` of a seeded headless timm model (float16, so the
    conversion is exact), with that model's state dict as `reference.safetensors`; overrides test_pretrained's
    Keras-written fixture for its `caches` fixture. The file with the top is never served here."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp('keras_files')
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_((value.uniform_(0.5, 1.5) if 'norm' in name else value).half().float())
    write_legacy_h5(model.state_dict(), ARCH, out / NOTOP_FILE, 'float16')
    save_file({k: v for k, v in model.state_dict().items() if 'num_batches' not in k}, out / 'reference.safetensors')
    return KerasFiles(out, ('0' * 32, _md5(out / NOTOP_FILE)), torch.zeros(0), None, None)


@pytest.fixture
def cache(caches: Path) -> Path:  # noqa: F811  (test_pretrained's fixture, with this module's keras_files)
    """Empty package and Keras caches, online, the download URL on a closed port, the stand-in's MD5s."""
    return caches


def _assert_reference_weights(model: torch.nn.Module, keras_files: KerasFiles) -> None:
    from safetensors.torch import load_file

    reference = load_file(keras_files.dir / 'reference.safetensors')
    state = {k: v for k, v in model.state_dict().items() if 'num_batches' not in k}
    assert sorted(reference) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def _run_child(code: str, keras_files: KerasFiles, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -c code MD5S *args`, from the pre-imported forkserver (tests/children.py)."""
    return run_python(code, _md5s_json(keras_files), *args, timeout=300, cwd=REPO, **kwargs)


def _md5s_json(keras_files: KerasFiles) -> str:
    return json.dumps(list(keras_files.md5s))


# --- item 3: downloads that stall, stop or cannot connect ---

def _faulty_handler(mode: str, release: threading.Event) -> type:
    class Faulty(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', str(BODY_BYTES))
            self.end_headers()
            self.wfile.write(b'\0' * SENT_BYTES)
            self.wfile.flush()
            if mode == 'stall':  # keep the connection open, send nothing more
                release.wait(120)

    return Faulty


@contextlib.contextmanager
def _faulty_server(mode: str, directory: Path) -> Iterator[Tuple[str, List[str]]]:
    release = threading.Event()
    try:
        with _serve(directory, _faulty_handler(mode, release)) as (url, requests):
            yield url, requests
    finally:
        release.set()


@contextlib.contextmanager
def _silent_server() -> Iterator[str]:
    """Accepts TCP connections (the kernel completes them from the backlog) and never reads or answers."""
    with socket.create_server(('127.0.0.1', 0), backlog=8) as server:
        yield f'http://127.0.0.1:{server.getsockname()[1]}/'


def _closed_port() -> int:
    with socket.create_server(('127.0.0.1', 0)) as server:
        return server.getsockname()[1]


def _stale_downloads(cache: Path) -> List[str]:
    return [p.name for p in cache.glob('.download-*')] if cache.is_dir() else []


@pytest.mark.parametrize('fault', ['headers_then_nothing', 'no_answer'])
def test_stalled_download_ends_after_the_timeout_and_leaves_nothing(cache, monkeypatch, tmp_path, fault):
    monkeypatch.setenv('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', str(TIMEOUT_S))
    server = _faulty_server('stall', tmp_path) if fault == 'headers_then_nothing' else _silent_server()
    with server as served:
        url = served[0] if isinstance(served, tuple) else served
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError) as info:
            timm.create_model(ARCH, pretrained=True)
        elapsed = time.monotonic() - start
    sent = SENT_BYTES if fault == 'headers_then_nothing' else 0
    assert f'download of {url}{TOP_FILE} failed: no bytes for {TIMEOUT_S} s (RESNETV2_ZOO_DOWNLOAD_TIMEOUT) after ' \
           f'{sent} bytes' in str(info.value)
    assert TIMEOUT_S - 0.1 <= elapsed <= TIMEOUT_S + 8
    assert _cache_entries(cache) == [] and _stale_downloads(cache) == []


def test_body_cut_short_is_refused_and_leaves_nothing(cache, monkeypatch, tmp_path):
    with _faulty_server('cut', tmp_path) as (url, requests):
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        with pytest.raises(WeightsUnavailableError,
                           match=f'download of {url}{TOP_FILE} failed: the connection closed after {SENT_BYTES} of '
                                 f'{BODY_BYTES} bytes'):
            timm.create_model(ARCH, pretrained=True)
    assert requests == [f'/{TOP_FILE}']
    assert _cache_entries(cache) == [] and _stale_downloads(cache) == []


def test_refused_connect_fails_at_once_naming_the_url(cache, monkeypatch):
    url = f'http://127.0.0.1:{_closed_port()}/'
    monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
    monkeypatch.setenv('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', '30')
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=f'download of {url}{TOP_FILE} failed: URLError: .*refused'):
        timm.create_model(ARCH, pretrained=True)
    assert time.monotonic() - start < 10  # not the 30 s timeout
    assert _cache_entries(cache) == [] and _stale_downloads(cache) == []


@pytest.mark.parametrize('name, value', [
    ('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', 'soon'), ('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', '0'),
    ('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', 'inf'), ('RESNETV2_ZOO_LOCK_TIMEOUT', '-1'), ('RESNETV2_ZOO_LOCK_TIMEOUT', 'nan'),
])
def test_bad_timeout_settings_are_refused_not_read_as_forever(cache, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with contextlib.ExitStack() as stack:
        if name == 'RESNETV2_ZOO_LOCK_TIMEOUT':  # read only when the lock is busy
            holder = stack.enter_context(_process(_HOLD_LOCK, str(pretrained._lock_path(ARCH))))
            assert holder.wait_for_stdout('locked\n', 60) == 'locked\n'
        with pytest.raises(ResNetV2ZooError) as info:
            timm.create_model(ARCH, pretrained=True)
    assert type(info.value) is ResNetV2ZooError  # not WeightsUnavailableError: finetune must not fall back on it
    assert f'{name} must be a finite number of seconds' in str(info.value) and repr(value) in str(info.value)


# --- item 3: the cache lock ---

_HOLD_LOCK = '''
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print('locked', flush=True)
time.sleep(600)
'''


@contextlib.contextmanager
def _process(code: str, *args: str) -> Iterator[Child]:
    """`python -c code *args` running (from the pre-imported forkserver) for the `with` block, then killed."""
    child = python_child(code, *args, cwd=REPO)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(60)


@pytest.mark.slow
def test_lock_held_by_a_live_process_gives_up_with_one_message(cache, keras_files, monkeypatch):
    """The waiter is a fresh process with no logging set up, as under the CLI: the message reaches stderr once."""
    monkeypatch.setenv('RESNETV2_ZOO_LOCK_TIMEOUT', str(TIMEOUT_S))
    lock = pretrained._lock_path(ARCH)
    with _process(_HOLD_LOCK, str(lock)) as holder:
        assert holder.wait_for_stdout('locked\n', 60) == 'locked\n'
        waiter = _run_child(_CREATE_CHILD, keras_files)
        assert holder.poll() is None
    assert waiter.returncode == 0, waiter.stderr[-3000:]
    elapsed = float(waiter.stdout.split('error after ')[1].split(' s:')[0])
    assert TIMEOUT_S - 0.1 <= elapsed <= TIMEOUT_S + 5
    assert f'gave up after {TIMEOUT_S} s waiting for {lock}, held by another process that is fetching or converting ' \
           f'the Keras weights of {ARCH}' in waiter.stdout
    assert waiter.stderr.count('waiting for') == 1
    assert f'waiting for {lock}: another process is fetching or converting the Keras weights of {ARCH}; giving up ' \
           f'after {TIMEOUT_S} s (RESNETV2_ZOO_LOCK_TIMEOUT)' in waiter.stderr


@pytest.mark.slow
def test_lock_of_a_killed_process_never_blocks(cache, keras_files, monkeypatch, tmp_path, caplog):
    """SIGKILL the holder mid-download: the next process converts at once and removes the partial download."""
    with _faulty_server('stall', tmp_path) as (url, requests):
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        monkeypatch.setenv('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', '600')
        with _process(_CREATE_CHILD, _md5s_json(keras_files)) as holder:
            deadline = time.monotonic() + 240
            while not requests and time.monotonic() < deadline and holder.poll() is None:
                time.sleep(0.05)
            assert requests == [f'/{TOP_FILE}'], holder.poll()  # the holder is downloading, under the lock
            assert _stale_downloads(cache)
            holder.send_signal(signal.SIGKILL)
            assert holder.wait(30) == -signal.SIGKILL
    shutil.copy(keras_files.dir / NOTOP_FILE, pretrained.keras_cache_dir() / NOTOP_FILE)
    monkeypatch.setenv('RESNETV2_ZOO_LOCK_TIMEOUT', '0')  # a lock still held would fail at once, not wait
    with caplog.at_level(logging.WARNING, logger=pretrained.__name__):
        model = timm.create_model(ARCH, pretrained=True, num_classes=0)
    assert not [r for r in caplog.records if 'waiting for' in r.getMessage()]
    _assert_reference_weights(model, keras_files)
    assert _stale_downloads(cache) == []
    assert _cache_entries(cache) == [f'{ARCH}.tf_in1k-notop', f'{ARCH}.tf_in1k-notop/README.md',
                                      f'{ARCH}.tf_in1k-notop/config.json', f'{ARCH}.tf_in1k-notop/model.safetensors']


# --- item 4: a cache that cannot be written ---

@pytest.fixture
def temp_conversions(monkeypatch) -> Dict:
    """A fresh record of this process's temporary conversions; dropping it removes their folders."""
    conversions: Dict = {}
    monkeypatch.setattr(pretrained, '_TEMP_CONVERSIONS', conversions)
    return conversions


def _unwritable(cache: Path, how: str, monkeypatch) -> Path:
    """Make the cache unwritable as `how` says: a path through a file, or a file in place of the folder."""
    blocker = cache.parent / 'blocker' if how == 'under_a_file' else cache
    blocker.write_text('not a folder')
    if how == 'under_a_file':
        monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(blocker / 'cache'))
    return blocker


@pytest.mark.parametrize('online', [True, False], ids=['online', 'offline'])
@pytest.mark.parametrize('how, error', [('under_a_file', 'NotADirectoryError'), ('is_a_file', 'FileExistsError')])
def test_unwritable_cache_without_keras_file_is_weights_unavailable(cache, monkeypatch, tmp_path, temp_conversions,
                                                                    how, error, online):
    blocker = _unwritable(cache, how, monkeypatch)
    if not online:
        monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
    with _serve(tmp_path) as (url, requests):
        monkeypatch.setenv('RESNETV2_ZOO_KERAS_URL', url)
        with pytest.raises(WeightsUnavailableError) as info:
            timm.create_model(ARCH, pretrained=True)
    message = str(info.value)
    assert f'the cache {pretrained.cache_dir()} is not writable ({error}: ' in message
    assert f'no {pretrained.keras_cache_dir() / TOP_FILE}' in message and 'Set RESNETV2_ZOO_CACHE' in message
    assert requests == []  # nothing downloaded that could not be kept
    assert blocker.read_text() == 'not a folder' and temp_conversions == {}


@pytest.mark.slow
def test_unwritable_cache_converts_keras_file_into_a_private_temp_folder(cache, keras_files, monkeypatch,
                                                                       temp_conversions, caplog):
    blocker = _unwritable(cache, 'under_a_file', monkeypatch)
    shutil.copy(keras_files.dir / NOTOP_FILE, pretrained.keras_cache_dir() / NOTOP_FILE)
    with caplog.at_level(logging.WARNING, logger=pretrained.__name__):
        model = timm.create_model(ARCH, pretrained=True, num_classes=0)
        again = timm.create_model(ARCH, pretrained=True, features_only=True)  # same process: no second conversion
    _assert_reference_weights(model, keras_files)
    (folder,) = [Path(t.name) for t in temp_conversions.values()]
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(f'resnetv2_zoo-{ARCH}.tf_in1k-')
    assert folder.stat().st_mode & 0o777 == 0o700
    assert Path(model.pretrained_cfg['file']) == Path(again.pretrained_cfg['file']) == \
        folder / 'weights' / 'model.safetensors'
    warnings = [r.getMessage() for r in caplog.records if 'not writable' in r.getMessage()]
    assert len(warnings) == 1 and f'converting {pretrained.keras_cache_dir() / NOTOP_FILE} into {folder}' in warnings[0]
    assert blocker.read_text() == 'not a folder'
    temp_conversions.clear()  # what the interpreter's exit does
    assert not folder.exists()


@pytest.mark.slow
def test_cache_of_another_account_converts_into_temp_folder_removed_at_exit(keras_files, monkeypatch):
    """A real PermissionError: the cache folder is nobody's, mode 0755, and the child runs as root without the
    capabilities that let root ignore file permissions (or, when the tests do not run as root, the folder is
    chmod 0555). The temporary folder is gone once the child has exited."""
    base = Path(tempfile.mkdtemp(prefix='resnetv2_zoo-test-'))
    try:
        base.chmod(0o755)
        cache, keras_models = base / 'cache', base / 'keras' / 'models'
        cache.mkdir()
        keras_models.mkdir(parents=True)
        shutil.copy(keras_files.dir / NOTOP_FILE, keras_models / NOTOP_FILE)
        for path in (base / 'keras', keras_models):
            path.chmod(0o755)
        (keras_models / NOTOP_FILE).chmod(0o644)
        reference = shutil.copy(keras_files.dir / 'reference.safetensors', base / 'reference.safetensors')
        Path(reference).chmod(0o644)
        monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(cache))
        monkeypatch.setenv('KERAS_HOME', str(base / 'keras'))
        monkeypatch.setenv('RESNETV2_ZOO_OFFLINE', '1')
        monkeypatch.setenv('HOME', str(base))
        if os.geteuid() == 0:
            os.chown(cache, 65534, 65534)
            cache.chmod(0o755)
            drop = dict(no_root_file_access=True)  # a root process without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
        else:
            cache.chmod(0o555)
            drop = {}
        child = _run_child(_UNWRITABLE_CHILD, keras_files, str(reference), **drop)
        assert child.returncode == 0, child.stderr[-3000:]
        assert f'the cache {cache} is not writable (PermissionError: Permission denied)' in child.stderr
        folder = Path(child.stdout.split('converted into ')[1].strip())
        assert folder.name.startswith(f'resnetv2_zoo-{ARCH}.tf_in1k-')
        assert not folder.exists()  # removed when the child exited
        assert list(cache.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_finetune_trains_from_scratch_on_an_unwritable_cache(cache, temp_conversions, tmp_path, monkeypatch,
                                                            caplog):
    _unwritable(cache, 'is_a_file', monkeypatch)
    argv = ['--data', str(tmp_path / 'data'), '--out', str(tmp_path / 'run'), '--model', ARCH]
    with caplog.at_level(logging.WARNING):
        model, source = create_classifier(finetune_args(argv), 3)
    assert source == 'scratch' and model.num_classes == 3
    (notice,) = [r.getMessage() for r in caplog.records if 'from scratch' in r.getMessage()]
    assert 'is not writable (FileExistsError' in notice and f'training {ARCH} from scratch' in notice
    with pytest.raises(WeightsUnavailableError, match='is not writable'):
        create_classifier(finetune_args([*argv, '--pretrained']), 3)
