"""`finetune` as people expect: dataset roots (train/ val/ test/), one-line errors for unknown models, timm
models without reachable weights, timm train.py checkpoints for --init, the output list, samples.png,
and the Python API `resnetv2_zoo.finetune`."""
import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from children import run_python
from PIL import Image

import resnetv2_zoo
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError, WeightsUnavailableError
from resnetv2_zoo.train.data import find_layout, load_splits
from resnetv2_zoo.train.demo import SYNTHETIC_CLASSES, make_synthetic_dataset
from resnetv2_zoo.train.finetune import RUN_FILES, create_classifier, finetune_args, save_samples, setup_run
from resnetv2_zoo.train.resume import rng_state
from resnetv2_zoo.weights.checkpoint import README_NAME

CLASSES = sorted(SYNTHETIC_CLASSES)
TINY = ['--img-size', '32', '--batch-size', '4', '--workers', '0', '--epochs', '1']


def listing(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


@pytest.fixture(scope='module')
def split_root(tmp_path_factory) -> Path:
    """weather4's layout in miniature: train/, val/ and test/ folders of the same 4 class folders, and a
    README.md beside them."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp('split') / 'root', train_per_class=4, test_per_class=2,
                                  size=32)
    shutil.copytree(root / 'test', root / 'val')
    (root / 'README.md').write_text('a dataset card: files beside the split folders are fine')
    return root


# --- dataset roots ---------------------------------------------------------------------------------------
def test_dataset_root_uses_its_split_folders(split_root):
    layout = find_layout(split_root)
    assert (layout.train, layout.val, layout.test) == tuple(str(split_root / s) for s in ('train', 'val', 'test'))
    assert layout.is_split_root and 'train/ for training, val/ for validation, test/ for the final report' in \
        layout.description
    splits = load_splits(split_root)
    assert splits.classes == CLASSES  # the classes inside train/, never 'train', 'val', 'test'
    assert len(splits.train) == 16 and len(splits.val) == 8 and len(splits.test) == 8
    assert all(Path(p).parts[-3] == 'train' for p, _ in splits.train)
    assert all(Path(p).parts[-3] == 'val' for p, _ in splits.val)
    assert sorted({t for _, t in splits.test}) == [0, 1, 2, 3]
    # control: a folder of class folders is still one ImageFolder, split for validation
    plain = find_layout(split_root / 'train')
    assert (plain.train, plain.val, plain.test) == (str(split_root / 'train'), None, None)
    assert not plain.is_split_root and len(load_splits(split_root / 'train').val) == 4


@pytest.mark.parametrize('val_name', ['valid', 'validation'])
def test_other_validation_names_and_no_validation_folder(tmp_path, split_root, val_name):
    root = tmp_path / 'root'
    shutil.copytree(split_root / 'train', root / 'train')
    shutil.copytree(split_root / 'val', root / val_name)
    layout = find_layout(root)
    assert layout.val == str(root / val_name) and layout.test is None
    shutil.rmtree(root / val_name)
    layout = find_layout(root)
    assert layout.val is None and 'validation split off train/' in layout.description
    splits = load_splits(root, val_split=0.25)
    assert len(splits.train) == 12 and len(splits.val) == 4 and splits.classes == CLASSES
    # an explicit --val-data wins over the root's own val/
    assert find_layout(split_root, split_root / 'test').val == str(split_root / 'test')


def write_class(folder: Path, count: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new('RGB', (8, 8), (40 * i, 90, 30)).save(folder / f'{i}.png')


@pytest.mark.parametrize('layout, fragment', [
    (['train/a', 'train/b', 'cats'], 'mixes split folder(s) train/ with other folders (cats)'),
    (['cats', 'dogs', 'val'], 'mixes split folder(s) val/ with other folders (cats, dogs)'),
    (['val/a', 'val/b', 'test/a'], 'has split folder(s) test/, val/ but no train/'),
    (['train', 'val'], 'holds images, not class folders: if train, val are your classes, rename them'),
])
def test_split_named_folders_are_never_taken_as_classes(tmp_path, capsys, layout, fragment):
    data = tmp_path / 'data'
    for folder in layout:
        write_class(data / folder)
    out = tmp_path / 'run'
    before = listing(tmp_path)
    assert main(['finetune', '--data', str(data), '--out', str(out), '--no-pretrained', *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('resnetv2-zoo finetune: error: ') and fragment in err, err
    assert listing(tmp_path) == before  # refused before anything was created


def test_test_folder_classes_must_be_training_classes(tmp_path, split_root):
    root = tmp_path / 'root'
    shutil.copytree(split_root, root)
    write_class(root / 'test' / 'purple hexagon')
    with pytest.raises(ResNetV2ZooError, match="class folders \\['purple hexagon'\\] that the training set"):
        load_splits(root)
    shutil.rmtree(root / 'test' / 'purple hexagon')
    shutil.rmtree(root / 'test' / CLASSES[0])  # control: a subset of the classes is fine
    assert sorted({t for _, t in load_splits(root).test}) == [1, 2, 3]


# --- unknown --model ----------------------------------------------------------------------------------
def test_unknown_model_is_one_line_with_a_suggestion_and_creates_nothing(split_root, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['finetune', '--data', str(split_root), '--out', str(out), '--model', 'resnet50v2_kears']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['resnetv2-zoo finetune: error: unknown model resnet50v2_kears; did you mean resnet50v2_keras?']
    assert listing(tmp_path) == []
    # control: the right name resolves
    assert finetune_args(['--data', str(split_root), '--out', str(out), '--model', 'resnet50v2_keras']).model == \
        'resnet50v2_keras'


# --- timm models without reachable weights ----------------------------------------------------------------
_OFFLINE_CHILD = r"""
import json, sys
import timm
import resnetv2_zoo
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import WeightsUnavailableError
from resnetv2_zoo.train.finetune import create_classifier, finetune_args

data, out = sys.argv[1], sys.argv[2]
result = {}
try:  # the control: this machine really cannot reach resnet18's weights
    timm.create_model('resnet18', pretrained=True)
    result['control'] = 'loaded'
except Exception as e:
    result['control'] = type(e).__name__
model, source = create_classifier(finetune_args(['--data', data, '--out', out, '--model', 'resnet18']), 3)
result['default'] = [source, model.num_classes]
try:
    create_classifier(finetune_args(['--data', data, '--out', out, '--model', 'resnet18', '--pretrained']), 3)
except WeightsUnavailableError as e:
    result['explicit'] = str(e)
result['cli'] = main(['finetune', '--data', data, '--out', out, '--model', 'resnet18', '--pretrained',
                      '--img-size', '32'])
print(json.dumps(result))
"""


@pytest.mark.slow
def test_timm_model_offline_falls_back_with_our_notice_or_fails_in_one_line(split_root, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), RESNETV2_ZOO_CACHE=str(tmp_path / 'c'))
    out = tmp_path / 'run'
    proc = run_python(_OFFLINE_CHILD, str(split_root), str(out), env=env, timeout=300)  # `python -c`, pre-imported
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['control'] == 'LocalEntryNotFoundError'
    assert result['default'] == ['scratch', 3]
    assert 'no pretrained weights for resnet18 could be loaded (LocalEntryNotFoundError' in proc.stderr
    assert '-> training resnet18 from scratch (random initialization)' in proc.stderr
    assert result['explicit'].startswith('no pretrained weights for resnet18 could be loaded')
    assert '\n' not in result['explicit']
    assert result['cli'] == 2 and 'Traceback' not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith('resnetv2-zoo finetune: error:')]
    assert 'no pretrained weights for resnet18' in line
    assert not out.exists()


def test_timm_model_without_published_weights_trains_from_scratch_with_a_notice(split_root, tmp_path, caplog):
    argv = ['--data', str(split_root), '--out', str(tmp_path / 'run'), '--model', 'mobilenetv2_035']
    model, source = create_classifier(finetune_args(argv), 3)
    assert source == 'scratch' and model.num_classes == 3
    assert 'timm has no pretrained weights for mobilenetv2_035' in caplog.text
    with pytest.raises(WeightsUnavailableError, match='timm has no pretrained weights for mobilenetv2_035'):
        create_classifier(finetune_args([*argv, '--pretrained']), 3)


# --- --init with a timm train.py checkpoint -------------------------------------------------------------
@pytest.fixture(scope='module')
def train_py_checkpoint(tmp_path_factory):
    """What timm's train.py saves (a DDP run: 'module.' prefixes), a 3-class resnet50v2_keras."""
    torch.manual_seed(0)
    model = timm.create_model('resnet50v2_keras', num_classes=3)
    path = tmp_path_factory.mktemp('pth') / 'model_best.pth.tar'
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    torch.save({'epoch': 3, 'arch': 'resnet50v2_keras', 'state_dict': state, 'state_dict_ema': state,
                'args': argparse.Namespace(model='resnet50v2_keras', lr=0.1), 'metric': 71.5, 'version': 2}, path)
    return model, path


def test_init_accepts_a_timm_train_py_checkpoint(split_root, tmp_path, train_py_checkpoint):
    saved, path = train_py_checkpoint
    args = finetune_args(['--data', str(split_root), '--out', str(tmp_path / 'run'), '--init', str(path)])
    assert args.model == 'resnet50v2_keras'  # taken from the checkpoint, so that --resume rebuilds the same model
    model, source = create_classifier(args, 4)
    assert source == f'init {path}' and model.num_classes == 4
    reference = saved.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith('head.fc'):
            assert torch.equal(value, reference[name]), name
    same, _ = create_classifier(args, 3)  # as many classes as the checkpoint: its head is kept
    assert torch.equal(same.state_dict()['head.fc.weight'], reference['head.fc.weight'])


def test_init_refuses_another_model_and_an_unsafe_pickle_in_one_line(split_root, tmp_path, train_py_checkpoint,
                                                                     capsys):
    _, path = train_py_checkpoint
    out = tmp_path / 'run'
    argv = ['finetune', '--data', str(split_root), '--out', str(out), '--init', str(path)]
    assert main([*argv, '--model', 'resnet101v2_keras']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds a resnet50v2_keras, not the --model resnet101v2_keras' in err, err
    unsafe = tmp_path / 'unsafe.pth.tar'
    torch.save({'arch': 'resnet50v2_keras', 'state_dict': {}, 'hook': random.Random(0)}, unsafe)
    assert main(['finetune', '--data', str(split_root), '--out', str(out), '--init', str(unsafe)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'weights_only=True' in err and 'Traceback' not in err, err
    assert f"torch.save({{'arch': c['arch'], 'state_dict': c['state_dict']}}, '{unsafe}.clean.pth.tar')" in err, err
    assert not out.exists()


# --- samples.png ------------------------------------------------------------------------------------------
def test_samples_figure_leaves_every_rng_as_it_was(split_root, tmp_path):
    args = finetune_args(['--data', str(split_root), '--out', str(tmp_path), '--model', 'test_resnet',
                          '--no-pretrained', *TINY])
    dist = argparse.Namespace(rank=0, world_size=1, distributed=False)
    run = setup_run(args, dist, torch.device('cpu'), tmp_path)
    before = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    resnetv2_zoo.train.resume.set_rng_state(before)
    save_samples(run)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    with Image.open(tmp_path / RUN_FILES['samples']) as img:
        assert img.format == 'PNG' and img.width > img.height / 2
    first = (tmp_path / RUN_FILES['samples']).read_bytes()
    save_samples(run)  # the same figure for the same seed
    assert (tmp_path / RUN_FILES['samples']).read_bytes() == first


# --- a whole run: CLI and API -----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def cli_run(split_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('cli') / 'run'
    with pytest.MonkeyPatch.context() as mp:
        stdout, stderr = [], []
        mp.setattr(sys, 'stdout', _Tee(stdout))
        mp.setattr(sys, 'stderr', _Tee(stderr))
        code = main(['finetune', '--data', str(split_root), '--out', str(out), '--no-pretrained', *TINY])
    return out, code, ''.join(stdout), ''.join(stderr)


class _Tee:
    def __init__(self, sink: list):
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.slow
def test_cli_run_on_a_dataset_root_reports_test_and_lists_every_output(cli_run, split_root):
    out, code, stdout, stderr = cli_run
    assert code == 0, stderr
    assert f'data: dataset root {split_root}: train/ for training, val/ for validation, test/ for the final ' \
           'report' in stderr
    summary = json.loads((out / RUN_FILES['summary']).read_text())
    assert summary['classes'] == CLASSES
    assert (summary['train_images'], summary['val_images'], summary['test_images']) == (16, 8, 8)
    assert summary['test_report']['num_images'] == 8 and f'== test ({split_root / "test"}' in stdout
    listed = stdout[stdout.index('Outputs:'):].splitlines()[1:]
    paths = [Path(line.split(maxsplit=1)[1].strip()) if not line.strip().startswith('model card')
             else Path(line.strip()[len('model card'):].strip()) for line in listed if line.strip()]
    assert {p for p in paths} == {out / f for f in RUN_FILES.values()} | {out / RUN_FILES['best'] / README_NAME}
    assert all(p.exists() for p in paths)
    card = (out / RUN_FILES['best'] / README_NAME).read_text()
    assert f'test accuracy (`test/`, best epoch) | {100 * summary["test_report"]["accuracy"]:.1f}% on 8 images' in card


@pytest.mark.slow
def test_python_api_runs_and_returns_the_result(split_root, tmp_path):
    out = tmp_path / 'api run'
    result = resnetv2_zoo.finetune(data=split_root / 'train', out=out, epochs=1, model='test_resnet',
                                   pretrained=False, img_size=32, batch_size=4, workers=0, val_split=0.25)
    assert result.run_dir == out and result.test_report is None and result.best_epoch == 1
    assert result.best_val_acc == pytest.approx(result.val_report.accuracy)
    assert result.outputs['best'] == out / 'best' and all(p.exists() for p in result.outputs.values())
    assert result.summary == json.loads((out / RUN_FILES['summary']).read_text())


def test_python_api_checks_options_before_creating_anything(split_root, tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        resnetv2_zoo.finetune(data=split_root, out=out, learning_rate=0.1)
    with pytest.raises(ResNetV2ZooError, match="batch_size=0: expected a positive integer"):
        resnetv2_zoo.finetune(data=split_root, out=out, batch_size=0)
    with pytest.raises(ResNetV2ZooError, match="pretrained='yes': expected True or False"):
        resnetv2_zoo.finetune(data=split_root, out=out, pretrained='yes')
    with pytest.raises(ResNetV2ZooError, match='unknown model resnet50v2_kears; did you mean resnet50v2_keras'):
        resnetv2_zoo.finetune(data=split_root, out=out, model='resnet50v2_kears')
    with pytest.raises(ResNetV2ZooError, match='needs --data DIR and --out RUN_DIR'):
        resnetv2_zoo.finetune(data=split_root)
    assert listing(tmp_path) == []


def test_help_names_every_default():
    """The parser leaves options unset (so that --resume knows what was typed); --help still gives each default."""
    parser = argparse.ArgumentParser()
    resnetv2_zoo.train.finetune.add_finetune_arguments(parser)
    no_default = {'help', 'data', 'out', 'resume', 'init', 'compile'}  # required, or nothing unless given
    missing = [a.dest for a in parser._actions if a.dest not in no_default and 'default' not in (a.help or '')]
    assert missing == []
    (lr,) = [a for a in parser._actions if a.dest == 'lr']
    assert lr.default is None and lr.help == '(default recipe: 0.001; tutorial recipe: 0.0001)'
