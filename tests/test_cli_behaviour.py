"""evaluate / predict as people expect: --device, --amp, a progress bar, the inference-optimized model by default,
timm train.py checkpoints, one-line errors for unknown models, defaults in --help; and the figures' readability."""
import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import resnetv2_zoo
from resnetv2_zoo.cli import build_parser, main
from resnetv2_zoo.train import plots
from resnetv2_zoo.train.runtime import load_classifier, prepare_for_inference
from resnetv2_zoo.weights.checkpoint import save_model_dir

ARCH = 'resnet50v2_keras'
CLASSES = ('a', 'b', 'c')
COLORS = {'a': (220, 30, 30), 'b': (30, 200, 40), 'c': (20, 40, 210)}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 3-class model (random weights, non-trivial BN statistics) as a model directory and as a timm train.py
    checkpoint (`.pth.tar`: a pickle with an argparse.Namespace), and an image folder of its classes."""
    root = tmp_path_factory.mktemp('cli')
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    model_dir = save_model_dir(model, root / 'model', CLASSES)
    pth = root / 'model_best.pth.tar'
    torch.save({'epoch': 1, 'arch': ARCH, 'state_dict': model.state_dict(), 'version': 2,
                'args': argparse.Namespace(model=ARCH, num_classes=3, lr=0.1), 'metric': 50.0}, pth)
    data = root / 'data'
    for name in CLASSES:
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (40, 36), tuple(int(v) - 20 * i for v in COLORS[name])).save(data / name / f'{i}.png')
    return model, model_dir, pth, data


def listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


@pytest.mark.parametrize('argv', [
    ['evaluate', 'resnet50v2_kears', '--data', 'DATA', '--plot', 'OUT/cm.png'],
    ['predict', 'resnet50v2_kears', 'DATA'],
    ['export', 'resnet50v2_kears', '-o', 'OUT/m.onnx'],
])
def test_unknown_model_is_one_line_with_a_suggestion_and_creates_nothing(argv, tmp_path, capsys):
    data, out = tmp_path / 'data', tmp_path / 'out'
    (data / 'a').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(data / 'a' / 'x.png')
    out.mkdir()
    before = listing(tmp_path)
    argv = [a.replace('DATA', str(data)).replace('OUT', str(out)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'resnetv2-zoo {argv[0]}: error: unknown model resnet50v2_kears; did you mean resnet50v2_keras?']
    assert listing(tmp_path) == before


def test_missing_checkpoint_path_says_so(tmp_path, capsys):
    assert main(['predict', str(tmp_path / 'run' / 'best'), str(tmp_path)]) == 2
    assert 'no such file or directory' in capsys.readouterr().err


def test_help_shows_defaults():
    for command in ('evaluate', 'predict', 'export', 'convert', 'demo'):
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, True, argparse.SUPPRESS):
                assert f'default: {action.default}' in text, (command, action.dest)
    assert '(default: 32)' in build_parser()._subparsers._group_actions[0].choices['evaluate'].format_help()


def test_amp_fp16_on_the_cpu_and_a_missing_device_are_refused(trained, tmp_path, capsys):
    _, model_dir, _, data = trained
    assert main(['predict', str(model_dir), str(data), '--device', 'cpu', '--amp', 'fp16']) == 2
    assert 'fp16 needs a CUDA device' in capsys.readouterr().err
    assert main(['evaluate', str(model_dir), '--data', str(data), '--device', 'cuda:99']) == 2
    assert '--device cuda:99' in capsys.readouterr().err


@pytest.mark.slow
def test_optimized_inference_is_the_default_and_matches_the_model(trained):
    model, model_dir, _, data = trained
    optimized = prepare_for_inference(load_classifier(model_dir), torch.device('cpu'))
    plain = prepare_for_inference(load_classifier(model_dir), torch.device('cpu'), optimize=False)
    block = optimized.stages[0].blocks[0]
    assert isinstance(block.norm2, torch.nn.ReLU)
    assert block.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(plain.stages[0].blocks[0].norm2, torch.nn.BatchNorm2d)  # control: --no-optimize
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = optimized(x.contiguous(memory_format=torch.channels_last))
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    fast = resnetv2_zoo.evaluate(str(model_dir), str(data), img_size=32, device='cpu')
    slow = resnetv2_zoo.evaluate(str(model_dir), str(data), img_size=32, device='cpu', optimize=False)
    assert fast.confusion == slow.confusion and fast.num_images == 6


@pytest.mark.slow
def test_bf16_autocast_on_the_cpu(trained):
    _, model_dir, _, data = trained
    full = resnetv2_zoo.predict(str(model_dir), [str(data)], top_k=3, img_size=32, device='cpu', amp='none')
    bf16 = resnetv2_zoo.predict(str(model_dir), [str(data)], top_k=3, img_size=32, device='cpu', amp='bf16')
    assert [p.path for p in full.predictions] == [p.path for p in bf16.predictions]
    for a, b in zip(full.predictions, bf16.predictions):
        assert sum(prob for _, prob in b.top) == pytest.approx(1.0, abs=1e-3)
        assert dict(a.top) == pytest.approx(dict(b.top), abs=0.05)


@pytest.mark.slow
def test_progress_bar_past_one_batch_only(trained, capfd):
    _, model_dir, _, data = trained
    resnetv2_zoo.evaluate(str(model_dir), str(data), img_size=32, batch_size=2, progress=True)
    assert 'predict' in capfd.readouterr().err  # 3 batches: tqdm's bar
    resnetv2_zoo.evaluate(str(model_dir), str(data), img_size=32, batch_size=8, progress=True)
    assert 'predict' not in capfd.readouterr().err  # one batch: no bar
    assert main(['evaluate', str(model_dir), '--data', str(data), '--img-size', '32', '--batch-size', '2',
                 '--no-progress']) == 0
    assert 'predict' not in capfd.readouterr().err


@pytest.mark.slow
def test_timm_train_checkpoint_is_accepted(trained, capsys):
    model, model_dir, pth, data = trained
    from_dir = resnetv2_zoo.evaluate(str(model_dir), str(data), img_size=32)
    from_pth = resnetv2_zoo.evaluate(str(pth), str(data), img_size=32)  # classes: the folders in sorted order
    assert from_pth.confusion == from_dir.confusion and [c.name for c in from_pth.classes] == list(CLASSES)
    assert main(['predict', str(pth), str(data / 'a'), '--img-size', '32', '--top-k', '1']) == 0
    assert 'class ' in capsys.readouterr().out  # train.py stores no class names
    loaded = load_classifier(pth)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class _Boom:
    def __reduce__(self):
        return (os.system, ('touch PWNED',))


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / 'evil.pth.tar'
    with open(bad, 'wb') as f:
        pickle.dump({'arch': ARCH, 'state_dict': {}, 'x': _Boom()}, f)
    Image.new('RGB', (8, 8)).save(tmp_path / 'x.png')
    assert main(['predict', str(bad), str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert 'weights_only=True' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'PWNED').exists()
    no_arch = tmp_path / 'no_arch.pth.tar'
    torch.save({'state_dict': {}}, no_arch)  # control: a safe file that is still not a checkpoint
    assert main(['predict', str(no_arch), str(tmp_path / 'x.png')]) == 2
    assert "'arch' None is not a timm model" in capsys.readouterr().err


# --- figures ---

def _capture(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, '_save', lambda fig, path: figures.append(fig))
    return figures


def test_curves_have_whole_epoch_ticks_and_percent(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    history = [dict(epoch=e, train_acc=0.3 + 0.2 * e, val_acc=0.25 + 0.2 * e, train_loss=1 / e, val_loss=1.1 / e)
               for e in (1, 2, 3)]
    plots.save_curves(history, tmp_path / 'curves.png')
    acc_ax, loss_ax = figures[0].axes
    figures[0].canvas.draw()
    for ax in (acc_ax, loss_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert max(max(line.get_ydata()) for line in acc_ax.get_lines()) == pytest.approx(90.0)  # 0.9 as 90 %
    assert all(label.get_text().endswith('%') for label in acc_ax.get_yticklabels() if label.get_text())


def test_prediction_grid_has_a_legend_colours_and_titles_that_do_not_overlap(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(np.full((60, 80, 3), 40 * i, np.uint8)).save(paths[-1])
    classes = ['cloudy', 'a very long class name that would run into the next picture if it were not wrapped',
               'Egyptian cat, Felis catus domesticus']
    plots.save_predictions_grid(paths, [0, 1, 2, 1, 0, 2], [0, 2, 2, 1, 1, 0], classes, tmp_path / 'p.png')
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert legend_texts == ['predicted = true', 'predicted \u2260 true (\u2717)']
    axes = [ax for ax in fig.axes if ax.images]
    titles = [ax.title for ax in axes]
    assert all(t.get_text().startswith('pred: ') and '\ntrue: ' in t.get_text() for t in titles)
    right = [p == t for p, t in zip([0, 1, 2, 1, 0, 2], [0, 2, 2, 1, 1, 0])]
    assert [t.get_color() for t in titles] == [plots.RIGHT_COLOR if r else plots.WRONG_COLOR for r in right]
    boxes = [t.get_window_extent(renderer) for t in titles] + [ax.get_window_extent(renderer) for ax in axes]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[:len(titles)]):
            if i != j and not (i >= len(titles) and i - len(titles) == j):  # a title sits on its own image
                assert not a.overlaps(b), (i, j)
