"""finetune never writes where it should not, has one writer per run folder, and stops and continues cleanly.

Refusals (bad --out, a held folder, a resume that would change the run, bad arguments) are checked on the
command line: one line, exit 2, nothing created. Locking is checked against a live holder in this process
and a holder killed with SIGKILL; Ctrl-C and `--resume --epochs N` on real (tiny) runs.
"""
import json
import os
import re
import signal
import socket
import textwrap
from pathlib import Path

import pytest
import torch
from children import CLI, python_child

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.demo import make_synthetic_dataset
from resnetv2_zoo.train.finetune import create_scheduler, finetune_args
from resnetv2_zoo.train.resume import (
    HOLDER_FILE,
    LOCK_FILE,
    RESUME_FORMAT,
    RUN_FILES,
    check_out,
    hold_run_folder,
    plain_args,
    read_resume_state,
    resumed_options,
)

TINY = ('--img-size', '32', '--batch-size', '4', '--workers', '0', '--no-pretrained')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    """12 training images in 4 classes: with --val-split 0.25, 9 train (2 steps of 4) and 3 validate."""
    return make_synthetic_dataset(tmp_path_factory.mktemp('data'), train_per_class=3, test_per_class=1,
                                  size=32) / 'train'


def tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    return err


# --- --out -----------------------------------------------------------------------------------------------
def test_out_refusals_create_nothing(data, tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('mine')
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'paper.tex').write_text('mine')
    val = data.parent / 'test'
    cases = {
        tmp_path / 'notes.txt': 'is a file',
        tmp_path / 'notes.txt' / 'run': 'which is a file',
        data / 'run': 'is inside the image folder',
        data: 'is inside the image folder',
        val / 'run': 'is inside the image folder',
        tmp_path / 'docs': 'is a folder with other files in it',
    }
    before = tree(tmp_path), tree(data.parent)
    for out, message in cases.items():
        argv = ['finetune', '--data', str(data), '--val-data', str(val), '--out', str(out), *TINY]
        assert main(argv) == 2, out
        assert message in one_line_error(capsys), out
    assert (tree(tmp_path), tree(data.parent)) == before
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    # control: a new nested path, an empty folder and a run folder without a resume checkpoint are accepted
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'old_run').mkdir()
    (tmp_path / 'old_run' / RUN_FILES['metrics']).write_text('epoch\n')
    for out in (tmp_path / 'new' / 'run', tmp_path / 'empty', tmp_path / 'old_run'):
        check_out(out, [data, val])


def test_refused_or_failed_start_removes_only_what_it_made(tmp_path):
    out = tmp_path / 'a' / 'b' / 'run'
    with pytest.raises(RuntimeError, match='setup failed'), hold_run_folder(out, fresh=True):
        assert (out / LOCK_FILE).exists() and (out / HOLDER_FILE).exists()
        raise RuntimeError('setup failed')
    assert tree(tmp_path) == []
    # control: once the run wrote something, its folder and that file stay; the lock files go
    with hold_run_folder(out, fresh=True):
        (out / RUN_FILES['resume']).write_bytes(b'checkpoint')
    assert tree(tmp_path) == ['a', 'a/b', 'a/b/run', f'a/b/run/{RUN_FILES["resume"]}']


def test_offline_pretrained_refusal_leaves_no_folder(data, tmp_path, capsys, monkeypatch):
    from resnetv2_zoo.errors import WeightsUnavailableError

    def offline(*args, **kwargs):
        raise WeightsUnavailableError('no pretrained weights: offline (test)')

    monkeypatch.setattr('timm.create_model', offline)
    assert main(['finetune', '--data', str(data), '--out', str(tmp_path / 'x' / 'run'), '--pretrained',
                 '--img-size', '32']) == 2
    assert 'offline (test)' in one_line_error(capsys)
    assert tree(tmp_path) == []


# --- one writer per run folder ---------------------------------------------------------------------------
def test_a_live_holder_refuses_a_second_run_naming_it(data, tmp_path, capsys):
    run = tmp_path / 'run'
    with hold_run_folder(run, fresh=True):
        assert main(['finetune', '--data', str(data), '--out', str(run), *TINY]) == 2
        err = one_line_error(capsys)
        assert 'is in use by a running finetune' in err
        assert f'pid {os.getpid()} on {socket.gethostname()}, started 20' in err
        (run / RUN_FILES['resume']).write_bytes(b'not read: the lock comes first')
        assert main(['finetune', '--resume', str(run)]) == 2
        assert f'pid {os.getpid()}' in one_line_error(capsys)
    assert sorted(os.listdir(run)) == [RUN_FILES['resume']]  # the lock files went with the holder
    # control: free now, the same resume gets past the lock to the checkpoint itself
    assert main(['finetune', '--resume', str(run)]) == 2
    assert 'is not a resume checkpoint' in one_line_error(capsys)


HOLDER = textwrap.dedent('''
    import sys, time
    from resnetv2_zoo.train.resume import hold_run_folder
    with hold_run_folder(sys.argv[1], fresh=True):
        print('held', flush=True)
        time.sleep(120)
''')


@pytest.mark.slow
def test_a_lock_left_by_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / 'run'
    child = python_child(HOLDER, str(run))
    try:
        assert child.wait_for_stdout('\n', 120).strip() == 'held'
        held_by_child = f'in use by a running finetune \\(pid {child.pid} on '
        with pytest.raises(ResNetV2ZooError, match=held_by_child), hold_run_folder(run, fresh=False):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert {LOCK_FILE, HOLDER_FILE} <= set(os.listdir(run))  # left behind by the kill
    assert json.loads((run / HOLDER_FILE).read_text())['pid'] == child.pid
    with hold_run_folder(run, fresh=False):
        assert json.loads((run / HOLDER_FILE).read_text())['pid'] == os.getpid()
    assert os.listdir(run) == []


# --- what --resume may change ----------------------------------------------------------------------------
@pytest.fixture
def saved_run(data, tmp_path) -> Path:
    """A run folder whose resume checkpoint holds only the options (what the flag check reads first)."""
    run = tmp_path / 'run'
    run.mkdir()
    args = finetune_args(['--data', str(data), '--out', str(run), *TINY])
    args.img_size = 32
    torch.save(dict(format=RESUME_FORMAT, args=plain_args(args)), run / RUN_FILES['resume'])
    return run


@pytest.mark.parametrize('flag, value, saved', [
    ('--data', 'OTHER', 'DATA'), ('--model', 'resnet101v2_keras', 'resnet50v2_keras'), ('--img-size', '64', '32'),
    ('--batch-size', '8', '4'), ('--recipe', 'tutorial', 'default'), ('--lr', '0.1', '0.001'),
    ('--pretrained', None, 'False'), ('--seed', '1', '0'), ('--val-split', '0.5', '0.2'),
])
def test_resume_refuses_flags_that_change_the_run(saved_run, data, flag, value, saved, capsys):
    value = str(data.parent / 'test') if value == 'OTHER' else value
    saved = str(data) if saved == 'DATA' else saved
    before = (saved_run / RUN_FILES['resume']).read_bytes()
    argv = ['finetune', '--resume', str(saved_run), flag] + ([value] if value is not None else [])
    assert main(argv) == 2
    shown = 'True' if value is None else value
    err = one_line_error(capsys)
    assert f'{flag} {shown} would change the run in {saved_run}, which has {flag} {saved};' in err
    assert (saved_run / RUN_FILES['resume']).read_bytes() == before and sorted(os.listdir(saved_run)) == ['last.pt']


def test_resume_epochs_only_grow_and_execution_flags_may_change(saved_run, data, capsys, monkeypatch):
    assert main(['finetune', '--resume', str(saved_run), '--epochs', '3']) == 2
    assert '--epochs 3 would shorten the run' in one_line_error(capsys)
    assert main(['finetune', '--resume', str(saved_run), '--out', str(saved_run.parent / 'other')]) == 2
    assert 'name different folders' in one_line_error(capsys)
    # control: the same values typed again (a relative --data too), execution flags and a longer run pass
    saved = read_resume_state(saved_run)['args']
    monkeypatch.chdir(data.parent)
    given = finetune_args(['--resume', str(saved_run), '--data', 'train', '--img-size', '32', '--workers', '3',
                           '--epochs', '12', '--no-pretrained', '--out', str(saved_run)])
    options = resumed_options(saved, given, saved_run)
    assert options == dict(saved, workers=3, epochs=12)


# --- the parser ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('flag, value', [
    ('--img-size', '0'), ('--img-size', '16'), ('--batch-size', '0'), ('--epochs', '0'), ('--epochs', 'two'),
    ('--workers', '-1'), ('--val-split', '1.5'), ('--lr', '0'), ('--seed', '-1'), ('--checkpoint-every', '-2'),
])  # an unknown --model is one line with a suggestion instead: tests/test_finetune_cli.py
def test_parser_refuses_bad_numbers(data, tmp_path, flag, value, capsys):
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as exit_info:
        main(['finetune', '--data', str(data), '--out', str(out), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if 'error:' in line]
    assert f'argument {flag}' in error and 'Traceback' not in err
    assert not out.exists()
    # control: a valid value parses
    good = {'--img-size': '32', '--val-split': '0.5', '--lr': '0.5', '--model': 'resnet50v2_keras'}.get(flag, '1')
    assert finetune_args(['--data', str(data), '--out', str(out), flag, good]) is not None


# --- real runs: extend, Ctrl-C ---------------------------------------------------------------------------
def metrics(run: Path) -> list:
    return (run / RUN_FILES['metrics']).read_text().splitlines()[1:]


@pytest.mark.slow
def test_resume_with_more_epochs_extends_the_run_on_a_rebuilt_schedule(data, tmp_path, caplog):
    run = tmp_path / 'run'
    assert main(['finetune', '--data', str(data), '--out', str(run), '--epochs', '1', '--val-split', '0.25',
                 *TINY]) == 0
    assert len(metrics(run)) == 1 and read_resume_state(run)['progress']['num_updates'] == 2
    assert main(['finetune', '--resume', str(run), '--epochs', '2']) == 0
    assert [row.split(',')[0] for row in metrics(run)] == ['1', '2']
    assert json.loads((run / RUN_FILES['summary']).read_text())['epochs'] == 2
    state = read_resume_state(run)
    assert state['args']['epochs'] == 2 and state['progress']['epoch'] == 2
    # the learning rate picked up at update 2 is the 2-epoch cosine's, not the finished 1-epoch one's minimum
    lr_now = float(re.search(r'extending the run from 1 to 2 epochs: .* \(lr now (\S+)\)', caplog.text).group(1))
    args = finetune_args(['--data', str(data), '--out', str(run), '--epochs', '2', *TINY])
    expected = {}
    for epochs in (1, 2):
        args.epochs = epochs
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
        create_scheduler(args, optimizer, steps_per_epoch=2).step_update(2)
        expected[epochs] = optimizer.param_groups[0]['lr']
    assert lr_now == pytest.approx(expected[2], rel=1e-2) and expected[2] > 10 * expected[1]


@pytest.mark.slow
def test_ctrl_c_during_an_epoch_exits_130_with_a_resume_hint(data, tmp_path):
    run = tmp_path / 'run'
    child = python_child(CLI, 'finetune', '--data', str(data), '--out', str(run), '--epochs', '2', '--val-split',
                         '0.25', '--checkpoint-every', '1', *TINY)  # `python -m resnetv2_zoo.cli finetune ...`
    child.wait_for_stderr('saved resume checkpoint at epoch 1, step 1/2', timeout=600)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=600) == 130
    err = child.read_stderr()
    assert 'Traceback' not in err and err.count('interrupted') == 1, err
    assert err.rstrip().splitlines()[-1].endswith(f'interrupted; resume with: resnetv2-zoo finetune --resume {run}')
    assert read_resume_state(run)['progress']['step'] == 1  # last.pt intact: the mid-epoch checkpoint
    assert not (run / LOCK_FILE).exists()  # the lock went with the interrupted run
    assert main(['finetune', '--resume', str(run)]) == 0
    assert [row.split(',')[0] for row in metrics(run)] == ['1', '2']
