"""Outputs are safe (issue 9): `convert -o` replaces only what this package wrote, outputs follow the
umask, Ctrl-C leaves nothing behind, checkpoint loading is strict, and concurrent replacement never
shows a reader a missing or partial destination.

Each refusal is checked against a snapshot of the whole test folder (names, bytes, modes, times), so
"nothing is touched" includes temporary dot-files. The Keras input is written with h5py from a timm
model (`write_legacy_h5`), without TensorFlow.
"""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from children import python_child
from keras_helpers import write_legacy_h5

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.models.resnetv2_keras import ResNetV2Keras
from resnetv2_zoo.weights import checkpoint
from resnetv2_zoo.weights.atomic import atomic_dir, current_umask
from resnetv2_zoo.weights.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model_dir, save_weights_file
from resnetv2_zoo.weights.convert import convert_to_dir, convert_to_file

ARCH = 'resnet50v2_keras'
REPO = Path(__file__).resolve().parents[1]
_CONVERT_CHILD = """
import sys
from resnetv2_zoo.cli import main
sys.exit(main(['convert', *sys.argv[1:]]))
"""


@pytest.fixture(scope='module')
def keras_h5(tmp_path_factory) -> Path:
    """A seeded headless ResNet50V2 as a float16 Keras 2 `.h5` (47 MB), in a folder of its own."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    return write_legacy_h5(model.state_dict(), ARCH, tmp_path_factory.mktemp('keras') / 'resnet50v2_notop.h5',
                           'float16')


def snapshot(root: Path) -> Dict[str, Tuple]:
    """Everything under `root` (dot-files included): type, mode, times, bytes or link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            content = (os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None)
            found[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_mode, info.st_mtime_ns, content)
    return found


def own_weights_file(path: Path, num_classes: int = 2) -> Path:
    """A small `.safetensors` file with the metadata this package writes (what 'our own output' means)."""
    safetensors.torch.save_file({'head.fc.weight': torch.zeros(num_classes, 4)}, str(path),
                                metadata={'format': 'pt', 'architecture': ARCH, 'num_classes': str(num_classes)})
    return path


def own_model_dir(path: Path) -> Path:
    path.mkdir()
    own_weights_file(path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps({'architecture': ARCH, 'num_classes': 2}))
    return path


# --- item 1: `convert -o` replaces only what this package wrote ---

def _foreign_dir(root: Path) -> Path:
    (root / 'docs').mkdir()
    (root / 'docs' / 'index.html').write_text('<p>my notes</p>')
    return root / 'docs'


def _foreign_model_dir(root: Path) -> Path:
    """config.json + model.safetensors, but written by someone else (timm's save_for_hf has no architecture)."""
    (root / 'theirs').mkdir()
    safetensors.torch.save_file({'w': torch.ones(2)}, str(root / 'theirs' / WEIGHTS_NAME), metadata={'format': 'pt'})
    (root / 'theirs' / CONFIG_NAME).write_text('{}')
    return root / 'theirs'


def _own_dir_with_an_extra_file(root: Path) -> Path:
    out = own_model_dir(root / 'model')
    (out / 'notes.txt').write_text('mine')
    return out


def _plain_file(root: Path) -> Path:
    (root / 'results.csv').write_text('a,b\n1,2\n')
    return root / 'results.csv'


def _symlink_to_own_dir(root: Path) -> Path:
    own_model_dir(root / 'model')
    (root / 'link').symlink_to(root / 'model')
    return root / 'link'


def _foreign_safetensors(root: Path) -> Path:
    safetensors.torch.save_file({'w': torch.ones(2)}, str(root / 'theirs.safetensors'), metadata={'format': 'pt'})
    return root / 'theirs.safetensors'


def _text_named_safetensors(root: Path) -> Path:
    (root / 'notes.safetensors').write_text('not a tensor file')
    return root / 'notes.safetensors'


def _own_dir_named_safetensors(root: Path) -> Path:
    return own_model_dir(root / 'model.safetensors')


def _own_file_where_a_dir_goes(root: Path) -> Path:
    return own_weights_file(root / 'model')


# (case, make the output under root (input at root/in/resnet50v2_notop.h5), extra args, message fragment)
REFUSED_OUTPUTS = [
    ('foreign_directory', _foreign_dir, [], 'is not a model directory resnetv2-zoo wrote (it holds index.html)'),
    ('foreign_model_directory', _foreign_model_dir, [], 'is not a model directory resnetv2-zoo wrote'),
    ('own_directory_plus_a_file', _own_dir_with_an_extra_file, [], 'notes.txt'),
    ('plain_file', _plain_file, [], 'it is a file, not a model directory'),
    ('symlink_to_own_directory', _symlink_to_own_dir, [], 'it is a symbolic link'),
    ('own_file_where_a_directory_goes', _own_file_where_a_dir_goes, [], 'it is a file, not a model directory'),
    ('single_file_csv', _plain_file, ['--single-file'], 'must end in .safetensors'),
    ('single_file_new_csv', lambda root: root / 'new.csv', ['--single-file'], 'must end in .safetensors'),
    ('single_file_foreign_safetensors', _foreign_safetensors, ['--single-file'], 'a file resnetv2-zoo did not write'),
    ('single_file_text_named_safetensors', _text_named_safetensors, ['--single-file'], 'did not write'),
    ('single_file_over_own_directory', _own_dir_named_safetensors, ['--single-file'], 'it is a directory'),
    ('the_input_itself', lambda root: root / 'in' / 'resnet50v2_notop.h5', [], 'it is the input'),
    ('the_input_folder', lambda root: root / 'in', [], 'is inside it'),
    ('a_folder_above_the_input', lambda root: root, [], 'is inside it'),
]


@pytest.mark.parametrize('make_out,extra,fragment', [c[1:] for c in REFUSED_OUTPUTS],
                         ids=[c[0] for c in REFUSED_OUTPUTS])
def test_convert_refuses_outputs_it_did_not_make(keras_h5, tmp_path, capsys, make_out, extra, fragment):
    source = tmp_path / 'in' / keras_h5.name
    source.parent.mkdir()
    os.link(keras_h5, source)  # the input inside tmp_path, so that the snapshot covers it too
    out = make_out(tmp_path)
    before = snapshot(tmp_path)
    assert main(['convert', str(source), '-o', str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('resnetv2-zoo convert: error: ') and str(out) in err, err
    assert fragment in err, err
    assert snapshot(tmp_path) == before  # nothing touched, nothing new (not even a dot-file)


@pytest.mark.slow
def test_convert_replaces_its_own_outputs_keeping_a_readme(keras_h5, tmp_path):
    """The control: what the refusals spare is replaced when it is ours; outputs follow the umask."""
    umask = current_umask()
    out = own_model_dir(tmp_path / 'model')
    (out / 'README.md').write_text('# my model card')
    empty = tmp_path / 'empty'
    empty.mkdir()
    single = own_weights_file(tmp_path / 'model.safetensors')
    assert main(['convert', str(keras_h5), '-o', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', CONFIG_NAME, WEIGHTS_NAME]
    assert (out / 'README.md').read_text() == '# my model card'
    assert load_model(out).num_classes == 0
    save_model_dir(timm.create_model('test_resnet'), empty)  # an empty folder holds nothing to lose
    assert sorted(p.name for p in empty.iterdir()) == ['README.md', CONFIG_NAME, WEIGHTS_NAME]  # with its model card
    assert main(['convert', str(keras_h5), '-o', str(single), '--single-file']) == 0
    assert checkpoint.read_weights_metadata(single)['architecture'] == ARCH and load_model(single).num_classes == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty', 'model', 'model.safetensors']
    for path in (out, empty):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    for path in (out / CONFIG_NAME, out / WEIGHTS_NAME, empty / WEIGHTS_NAME, single):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


@pytest.mark.slow
def test_a_failed_load_back_check_keeps_the_previous_output(keras_h5, tmp_path, monkeypatch):
    """The written output is checked before the rename: a bad one never lands, the previous one stays."""
    monkeypatch.setattr('resnetv2_zoo.weights.convert._same_bits', lambda a, b: False)  # as if the bits differed
    previous_dir = own_model_dir(tmp_path / 'model')
    previous_file = own_weights_file(tmp_path / 'model.safetensors')
    before = snapshot(tmp_path)
    for convert, out in ((convert_to_dir, previous_dir), (convert_to_file, previous_file),
                         (convert_to_dir, tmp_path / 'fresh')):
        with pytest.raises(ResNetV2ZooError, match='would not load back to the converted weights; nothing was '
                                                   'written') as info:
            convert(keras_h5, out)
        assert str(out) in str(info.value)
        assert snapshot(tmp_path) == before


# --- item 2: files follow the umask ---

_UMASK_CHILD = """
import sys
from pathlib import Path
import timm
import resnetv2_zoo
from resnetv2_zoo.weights.atomic import atomic_file
from resnetv2_zoo.weights.checkpoint import save_model_dir, save_weights_file
root = Path(sys.argv[1])
model = timm.create_model('test_resnet', num_classes=2)  # timm's 0.5M-parameter test model: the same writers
save_model_dir(model, root / 'model')
save_model_dir(model, root / 'model')  # replacing, too
save_weights_file(model, root / 'model.safetensors')
with atomic_file(root / 'metrics.csv') as tmp:
    tmp.write_text('epoch,loss')
"""


@pytest.mark.slow
def test_outputs_follow_the_umask(tmp_path):
    assert stat.S_IMODE(os.stat(tempfile.mkstemp(dir=tmp_path)[1]).st_mode) == 0o600  # the control: why a fix is
    children = {}                                                                    # needed at all
    for umask in (0o022, 0o077):
        root = tmp_path / f'umask_{umask:03o}'
        root.mkdir()
        children[umask] = root, python_child(_UMASK_CHILD, str(root), umask=umask)
    for umask, (root, child) in children.items():
        assert child.wait(timeout=300) == 0, child.read_stderr()[-2000:]
        modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root / 'model', *root.rglob('*')]}
        assert sorted(modes) == ['metrics.csv', 'model', 'model.safetensors', 'model/README.md',
                                 f'model/{CONFIG_NAME}', f'model/{WEIGHTS_NAME}']
        expected_file, expected_dir = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}[umask]
        assert modes == {name: expected_dir if name == 'model' else expected_file for name in modes}, (umask, modes)


# --- item 7: Ctrl-C during convert ---

def _opened(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f'/proc/{pid}/fd/{fd}') == str(path) for fd in os.listdir(f'/proc/{pid}/fd'))
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='watches the child through /proc')
@pytest.mark.parametrize('phase,single_file', [('reading', False), ('writing', False), ('writing', True)])
def test_ctrl_c_during_convert_leaves_nothing_behind(keras_h5, tmp_path, phase, single_file):
    """SIGINT while the input is read, or as soon as the first temporary appears (over a previous output; writing
    and checking the ~100 MB output takes a few tenths of a second more): exit 130, one line, the folder exactly
    as before (previous output intact, no temporary)."""
    out = tmp_path / ('model.safetensors' if single_file else 'model')
    if phase == 'writing':
        own_weights_file(out) if single_file else own_model_dir(out)
    before = snapshot(tmp_path)
    child = python_child(_CONVERT_CHILD, str(keras_h5), '-o', str(out), *(['--single-file'] if single_file else []))
    if phase == 'reading':
        started = lambda: _opened(child.pid, keras_h5)  # noqa: E731
    else:
        started = lambda: any(n.startswith(f'.{out.name}.') for n in os.listdir(tmp_path))  # noqa: E731
    deadline = time.monotonic() + 300
    while not started():
        assert child.poll() is None, 'the conversion ended before it could be interrupted'
        assert time.monotonic() < deadline
        time.sleep(0.001)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert err == 'resnetv2-zoo convert: interrupted\n'
    assert snapshot(tmp_path) == before


def test_interrupt_hint_comes_from_the_exception(monkeypatch, capsys):
    """cli.main prints a command's own hint (finetune's resume command) when the KeyboardInterrupt carries one."""
    import resnetv2_zoo.weights.convert as convert_module

    def interrupted(args):
        raise KeyboardInterrupt('interrupted; resume with: resnetv2-zoo finetune --resume RUN')

    monkeypatch.setattr(convert_module, '_run', interrupted)
    assert main(['convert', 'x.h5', '-o', 'y']) == 130
    expected = 'resnetv2-zoo convert: interrupted; resume with: resnetv2-zoo finetune --resume RUN\n'
    assert capsys.readouterr().err == expected


def test_interrupt_while_installing_takes_effect_after_the_cleanup(tmp_path, monkeypatch):
    """A Ctrl-C that lands while a directory is being swapped in is held until the temporary is gone."""
    import resnetv2_zoo.weights.atomic as atomic

    install = atomic._install_dir

    def interrupted_install(tmp, path):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the swap
        time.sleep(0.05)
        return install(tmp, path)

    monkeypatch.setattr(atomic, '_install_dir', interrupted_install)
    # Ctrl-C as in a terminal, also where pytest runs with SIGINT ignored (a background job: `make test &`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / 'out') as tmp:
            (tmp / 'a').write_text('complete')
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    assert (tmp_path / 'out' / 'a').read_text() == 'complete'


# --- item 9: checkpoint loading is strict ---

@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> Tuple[Path, Path, torch.nn.Module]:
    """A 3-class model as a model directory and as a single file, with the model itself."""
    torch.manual_seed(3)
    model = timm.create_model(ARCH, num_classes=3).eval()
    root = tmp_path_factory.mktemp('checkpoints')
    directory = save_model_dir(model, root / 'model', ['a', 'b', 'c'])
    return directory, save_weights_file(model, root / 'm.safetensors'), model


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _rewrite_weights(path: Path, edit_tensors=None, edit_metadata=None) -> None:
    tensors = safetensors.torch.load_file(str(path))
    metadata = checkpoint.read_weights_metadata(path)
    (edit_tensors or (lambda t: None))(tensors)
    (edit_metadata or (lambda m: None))(metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _set_classes(n: int):
    def edit(config):
        config['num_classes'] = config['model_args']['num_classes'] = config['pretrained_cfg']['num_classes'] = n
        config.pop('label_names')
    return edit


# (case, tamper with a copy of the directory or file, fragments the refusal names: both values)
TAMPERED = [
    ('config_num_classes', 'dir', lambda d: _edit_config(d, _set_classes(5)),
     ['config.json says num_classes 5', 'metadata says 3']),
    ('config_num_classes_weights_without_metadata', 'dir',
     lambda d: (_edit_config(d, _set_classes(5)), _rewrite_weights(d / WEIGHTS_NAME, edit_metadata=lambda m: [
         m.pop('architecture'), m.pop('num_classes'), m.pop('label_names')])),
     ['config.json says num_classes 5', 'holds a 3-class head (head.fc.weight [3, 2048])']),
    ('config_model_args_num_classes', 'dir', lambda d: _edit_config(d, lambda c: c['model_args'].update(num_classes=5)),
     ['says num_classes 3 but model_args.num_classes 5']),
    ('config_architecture', 'dir', lambda d: _edit_config(d, lambda c: c.update(architecture='resnet101v2_keras')),
     ['says architecture resnet101v2_keras', 'metadata says resnet50v2_keras']),
    ('config_label_names', 'dir', lambda d: _edit_config(d, lambda c: c.update(label_names=['a', 'b'])),
     ['has 2 label names but num_classes 3']),
    ('missing_tensor', 'dir',
     lambda d: _rewrite_weights(d / WEIGHTS_NAME, lambda t: t.pop('stages.3.blocks.2.conv3.weight')),
     ['missing tensors: stages.3.blocks.2.conv3.weight']),
    ('extra_tensor', 'dir', lambda d: _rewrite_weights(d / WEIGHTS_NAME, lambda t: t.update(extra=torch.zeros(1))),
     ['unexpected tensors: extra']),
    ('shape_mismatch', 'dir', lambda d: _rewrite_weights(d / WEIGHTS_NAME, lambda t: t.update(
        {'norm.weight': torch.zeros(7)})), ['norm.weight: expected [2048], found [7]']),
    ('file_num_classes', 'file', lambda f: _rewrite_weights(f, edit_metadata=lambda m: m.update(num_classes='5')),
     ['metadata says num_classes 5', 'holds a 3-class head']),
    ('file_architecture', 'file', lambda f: _rewrite_weights(
        f, edit_metadata=lambda m: m.update(architecture='resnet101v2_keras')),
     ['does not match resnet101v2_keras with 3 classes', 'missing tensors: stages.2.blocks.6.']),
    ('file_not_a_timm_model', 'file', lambda f: _rewrite_weights(
        f, edit_metadata=lambda m: m.update(architecture='no_such_model')),
     ["'no_such_model', which is not a timm model"]),
]


@pytest.mark.parametrize('kind,tamper,fragments', [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_load_refuses_a_checkpoint_that_disagrees_with_itself(checkpoints, tmp_path, kind, tamper, fragments):
    directory, single, _ = checkpoints
    if kind == 'dir':
        path = tmp_path / 'model'
        path.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (path / name).write_bytes((directory / name).read_bytes())
    else:
        path = tmp_path / single.name
        path.write_bytes(single.read_bytes())
    tamper(path)
    loaders = [load_model] + ([lambda p: timm.create_model(f'local-dir:{p}', pretrained=True)] if kind == 'dir' else [])
    for load in loaders:
        with pytest.raises(ResNetV2ZooError) as info:
            load(path)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)


@pytest.mark.slow
def test_a_consistent_checkpoint_loads_the_same_head_every_time(checkpoints):
    """The control for the refusals: the untampered checkpoint loads, three ways, to the saved model exactly."""
    directory, single, model = checkpoints
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        for loaded in (load_model(directory), load_model(single), timm.create_model(f'local-dir:{directory}',
                                                                                   pretrained=True)):
            assert torch.equal(loaded.eval()(images), expected)
    assert load_model(directory, num_classes=7).num_classes == 7  # a new head when asked for, as timm does


def test_load_refuses_a_head_left_at_random_init(checkpoints, monkeypatch):
    """Fault injection: a loader that re-initialises the classifier after loading (what timm does when the
    class counts differ) is caught by comparing the loaded head with the file's."""
    directory, single, _ = checkpoints
    load = ResNetV2Keras.load_state_dict

    def load_then_reinit_head(self, *args, **kwargs):
        result = load(self, *args, **kwargs)
        self.reset_classifier(self.num_classes)
        return result

    monkeypatch.setattr(ResNetV2Keras, 'load_state_dict', load_then_reinit_head)  # either way of loading
    for path in (directory, single):
        with pytest.raises(ResNetV2ZooError, match='head would be left at random initialisation'):
            load_model(path)


# --- item 10: concurrent replacement ---

_WRITER_CHILD = r"""
import sys, types
from pathlib import Path
package = types.ModuleType('resnetv2_zoo')
package.__path__ = [sys.argv[1]]
sys.modules['resnetv2_zoo'] = package  # atomic.py alone, without torch: the writers start at once
from resnetv2_zoo.weights.atomic import atomic_dir, atomic_file
dest_dir, dest_file, writer, count = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
for i in range(count):
    text = f'{writer}-{i}\n' + 'x' * 65536 + '\nEND\n'
    with atomic_dir(dest_dir) as tmp:
        for name in ('config.json', 'model.safetensors', 'README.md'):
            (tmp / name).write_text(text)
    with atomic_file(dest_file) as tmp:
        tmp.write_text(text)
"""
WRITERS, WRITES = 4, 50
DIR_NAMES = ['README.md', 'config.json', 'model.safetensors']


def _read_version(directory: Path) -> str:
    """The version a complete destination holds; raises AssertionError on a missing or partial one."""
    names = sorted(os.listdir(directory))  # FileNotFoundError: missing
    assert names == DIR_NAMES, f'partial: {names}'
    versions = {_read_file_version(directory / name) for name in names}
    return versions.pop()


def _read_file_version(path: Path) -> str:
    lines = path.read_text().split('\n')
    assert len(lines) == 4 and len(lines[1]) == 65536 and lines[2] == 'END', f'partial: {path}'
    return lines[0]


def _no_exchange(src, dst, flags):
    raise OSError(errno.EINVAL, 'Invalid argument')  # what a filesystem without RENAME_EXCHANGE answers


@pytest.mark.parametrize('renameat2', ['missing', 'refused'])
def test_atomic_dir_without_the_exchange_still_replaces_whole(tmp_path, monkeypatch, renameat2):
    """Other systems (no renameat2) and filesystems that refuse it fall back to move-aside-and-rename."""
    import resnetv2_zoo.weights.atomic as atomic

    monkeypatch.setattr(atomic, '_renameat2', None if renameat2 == 'missing' else _no_exchange)
    for version in ('one', 'two', 'three'):
        with atomic_dir(tmp_path / 'out') as tmp:
            (tmp / 'a').write_text(version)
        assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
        assert [p.read_text() for p in (tmp_path / 'out').iterdir()] == [version]
    assert atomic._renameat2 is None  # a refusal switches to the fallback for good


def test_the_reader_detects_missing_and_partial_destinations(tmp_path):
    """The control: the reader's check fails on each bad state it claims to detect."""
    directory = tmp_path / 'dest'
    with pytest.raises(FileNotFoundError):
        _read_version(directory)
    directory.mkdir()
    (directory / 'config.json').write_text('w-0\n' + 'x' * 65536 + '\nEND\n')
    with pytest.raises(AssertionError, match='partial'):
        _read_version(directory)
    for name in DIR_NAMES:
        (directory / name).write_text('w-0\n' + 'x' * 100)
    with pytest.raises(AssertionError, match='partial'):
        _read_version(directory)


@pytest.mark.slow
def test_concurrent_writers_all_succeed_and_a_reader_never_sees_a_gap(tmp_path):
    """4 processes x 50 replacements of one directory and one file, with a reader polling both meanwhile."""
    dest_dir, dest_file = tmp_path / 'dest', tmp_path / 'dest.txt'
    problems: List[str] = []
    versions, written = set(), set()
    done = threading.Event()

    def reader():
        while not done.is_set():
            for path, read in ((dest_dir, _read_version), (dest_file, _read_file_version)):
                try:
                    versions.add(read(path))
                    written.add(path)
                except FileNotFoundError:
                    if path in written:
                        problems.append(f'{path} missing after it was first written')
                except AssertionError as e:
                    problems.append(str(e))

    writers = [subprocess.Popen([sys.executable, '-c', _WRITER_CHILD, str(REPO / 'resnetv2_zoo'), str(dest_dir),
                                 str(dest_file), str(w), str(WRITES)], stderr=subprocess.PIPE, text=True)
               for w in range(WRITERS)]
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        errors = [w.communicate(timeout=120)[1] for w in writers]
    finally:
        done.set()
        thread.join()
    assert [w.returncode for w in writers] == [0] * WRITERS, errors
    assert problems == []
    assert len(versions) > 10  # the reader really polled while the writers replaced the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dest', 'dest.txt']  # no temporary left
