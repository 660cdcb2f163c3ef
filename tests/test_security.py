"""No code execution from files: the package never unpickles, and every pickle it is handed is refused unread.

Each hostile pickle carries a `__reduce__` that would create a marker file when unpickled, so a test
proves not only that loading fails but that nothing in the file ran.
"""
import ast
import pickle
from pathlib import Path
from typing import List

import pytest
import timm
import torch

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.finetune import RUN_FILES
from resnetv2_zoo.weights.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model_dir

REPO = Path(__file__).resolve().parents[1]
SCANNED = ('resnetv2_zoo', 'converters')
PICKLE_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'joblib', 'shelve', 'marshal'}


# --- the source scan ---

def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = '<source>') -> List[str]:
    """Every pickle import, `torch.load` without `weights_only=True` and `allow_pickle=True` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f'{filename}:{getattr(node, "lineno", "?")}'
        if isinstance(node, ast.Import):
            found += [f'{where}: import {a.name}' for a in node.names if a.name.split('.')[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in PICKLE_MODULES:
            found.append(f'{where}: from {node.module} import ...')
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func.endswith('.load') and func.split('.')[0] in ('torch', 'serialization') and not _is_true(
                    keywords.get('weights_only', ast.Constant(False))):
                found.append(f'{where}: {func}(...) without weights_only=True')
            if 'allow_pickle' in keywords and not (isinstance(keywords['allow_pickle'], ast.Constant)
                                                   and keywords['allow_pickle'].value is False):
                found.append(f'{where}: {func}(..., allow_pickle=...)')
            if func in ('torch.hub.load', 'torch.jit.load', 'torch.package.PackageImporter'):
                found.append(f'{where}: {func}(...) runs code from the loaded file')
    return found


def test_the_scan_finds_every_kind_of_unpickling():
    hostile = '\n'.join([
        'import pickle', 'import dill as d', 'from joblib import load', 'import torch',
        'torch.load(f)', 'torch.load(f, weights_only=False)', 'torch.load(f, map_location="cpu")',
        'numpy.load(f, allow_pickle=True)', 'torch.hub.load("repo", "model")',
    ])
    assert len(unsafe_loads(hostile)) == 9, unsafe_loads(hostile)
    assert unsafe_loads('import torch\ntorch.load(f, map_location="cpu", weights_only=True)\nnp.load(f)\n') == []


# The one load allowed: `weights.export` reads back the `.pt2` it has just written (its own temporary file, never
# one it was handed) to check it against eager; `torch.export.load` has no weights_only switch.
ALLOWED_LOADS = {('resnetv2_zoo/weights/export.py', 'torch.export.load(...) without weights_only=True')}


def test_the_package_never_unpickles():
    files = sorted(p for root in SCANNED for p in (REPO / root).rglob('*.py'))
    assert len(files) > 15  # the scan really covers the package
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    found = [hit for hit in found if (hit.split(':')[0], hit.split(': ', 1)[-1]) not in ALLOWED_LOADS]
    assert found == []


# --- hostile checkpoints ---

class Payload:
    """Unpickling this calls open(marker, 'w'): the marker file appearing means code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def hostile_files(directory: Path, marker: Path) -> List[Path]:
    """A raw pickle, and a torch.save'd state dict holding the payload, both under safetensors and .pt names."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {'stem.conv.weight': torch.zeros(1), 'extra': Payload(marker)}
    raw, saved = directory / 'raw.safetensors', directory / 'torch_save.safetensors'
    raw.write_bytes(pickle.dumps(Payload(marker)))
    torch.save(state, saved)
    pt = directory / 'torch_save.pt'
    pt.write_bytes(saved.read_bytes())
    assert not marker.exists()
    return [raw, saved, pt]


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The control: the same bytes do create the marker when unpickled, so the tests below can fail."""
    marker = tmp_path / 'ran'
    pickle.loads(hostile_files(tmp_path / 'files', marker)[0].read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(hostile_files(tmp_path / 'files', marker)[2], weights_only=False)
    assert marker.exists()


@pytest.fixture
def marker(tmp_path) -> Path:
    marker = tmp_path / 'code_ran'
    yield marker
    assert not marker.exists(), 'a checkpoint ran code while being loaded'


def model_dir_with(weights: Path, out: Path) -> Path:
    """A model directory with a valid config.json whose model.safetensors is `weights`."""
    save_model_dir(timm.create_model('resnet50v2_keras', num_classes=2), out)
    (out / WEIGHTS_NAME).write_bytes(weights.read_bytes())
    return out


def test_load_model_refuses_pickles_as_file_and_directory(tmp_path, marker):
    for path in hostile_files(tmp_path / 'files', marker):
        with pytest.raises(ResNetV2ZooError, match='is not a safetensors file') as info:
            load_model(path)
        assert str(path) in str(info.value)
        directory = model_dir_with(path, tmp_path / f'dir_{path.name}')
        with pytest.raises(ResNetV2ZooError, match='is not a safetensors file'):
            load_model(directory)


def test_timm_pytorch_model_bin_fallback_is_not_used(tmp_path, marker):
    """timm's local-dir reads pytorch_model.bin when model.safetensors is absent; load_model does not go there."""
    directory = model_dir_with(hostile_files(tmp_path / 'files', marker)[1], tmp_path / 'model')
    (directory / WEIGHTS_NAME).rename(directory / 'pytorch_model.bin')
    with pytest.raises(ResNetV2ZooError, match=f'needs {CONFIG_NAME} and {WEIGHTS_NAME}'):
        load_model(directory)


def test_cli_predict_evaluate_init_and_resume_refuse_pickles(tmp_path, marker, capsys):
    raw, saved, _ = hostile_files(tmp_path / 'files', marker)
    image = tmp_path / 'images' / 'a' / 'x.png'
    image.parent.mkdir(parents=True)
    (tmp_path / 'images' / 'b').mkdir()
    from PIL import Image

    Image.new('RGB', (8, 8)).save(image)
    Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'b' / 'y.png')
    for checkpoint in (raw, saved, model_dir_with(saved, tmp_path / 'model')):
        assert main(['predict', str(checkpoint), str(image)]) == 2
        assert main(['evaluate', str(checkpoint), '--data', str(tmp_path / 'images'), '--plot', '']) == 2
        assert main(['finetune', '--data', str(tmp_path / 'images'), '--out', str(tmp_path / 'run'), '--init',
                     str(checkpoint), '--epochs', '1', '--img-size', '32']) == 2
        err = capsys.readouterr().err
        assert err.count('is not a safetensors file') == 3, err
    for hostile in (raw, saved):
        run = tmp_path / f'run_{hostile.stem}'
        run.mkdir()
        (run / RUN_FILES['resume']).write_bytes(hostile.read_bytes())
        assert main(['finetune', '--resume', str(run)]) == 2
        assert 'is not a resume checkpoint' in capsys.readouterr().err


def test_resume_file_of_plain_types_but_not_a_dict_is_refused(tmp_path, capsys):
    """weights_only=True admits lists and tensors: the state must still be checked before use."""
    torch.save([1, 2, 3], tmp_path / RUN_FILES['resume'])
    assert main(['finetune', '--resume', str(tmp_path)]) == 2
    assert 'has resume format list, expected 1' in capsys.readouterr().err
