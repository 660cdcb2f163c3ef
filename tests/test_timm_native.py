"""timm-native behaviour: the official weights listed by timm, TorchScript of `features_only` models, and the
runner that gives timm's own scripts (train.py, validate.py, benchmark.py, inference.py) our models."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import children
import pytest
import timm
import torch
from timm.data import ImageNetInfo

import resnetv2_zoo
from resnetv2_zoo import cli
from resnetv2_zoo.errors import WeightsUnavailableError
from resnetv2_zoo.keras.spec import KERAS_RESNETS
from resnetv2_zoo.models.keras_weights import is_keras_weights_url, keras_weights_url
from resnetv2_zoo.weights.checkpoint import save_model_dir
from resnetv2_zoo.weights.pretrained import pretrained_kwargs

TIMM_SCRIPTS = Path(__file__).resolve().parents[2] / 'shared' / 'timm-scripts'
OFFICIAL_TAGS = sorted(f'{arch}.tf_in1k' for arch in KERAS_RESNETS)


def run_python(code: str, *args: str, cwd=None, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# --- item 3: list_pretrained / is_model_pretrained ---

@pytest.mark.slow
def test_timm_lists_the_official_weights_without_network_or_files_at_import(tmp_path):
    cache = tmp_path / 'cache'
    code = '\n'.join([
        'import json, socket, timm',
        'def refuse(*a, **k): raise AssertionError("network access at import")',
        'socket.socket.connect = refuse',
        'before = timm.list_pretrained("*_keras*")',
        'import resnetv2_zoo',
        'print(json.dumps([before, timm.list_pretrained("*_keras*"), timm.is_model_pretrained("resnet50v2_keras"),',
        '                  timm.is_model_pretrained("resnet152v2_keras.tf_in1k")]))',
    ])
    proc = run_python(code, env=dict(RESNETV2_ZOO_CACHE=str(cache), KERAS_HOME=str(tmp_path / 'keras')))
    assert proc.returncode == 0, proc.stderr
    before, after, untagged, tagged = json.loads(proc.stdout)
    assert before == []  # control: timm alone knows none of them
    assert sorted(after) == OFFICIAL_TAGS and untagged and tagged
    assert not cache.exists() and not (tmp_path / 'keras').exists()  # nothing made, nothing looked up on disk


def test_the_cfg_url_is_the_official_keras_file():
    cfg = timm.models.get_pretrained_cfg('resnet50v2_keras')
    assert cfg.url == keras_weights_url('resnet50v2_keras') and cfg.url.endswith(
        'resnet50v2_weights_tf_dim_ordering_tf_kernels.h5')
    assert is_keras_weights_url(cfg.url) and not is_keras_weights_url('https://example.com/other.h5')
    assert not timm.is_model_pretrained('resnet50v2_keras.no_such_tag')


@pytest.fixture
def seeded_cache(tmp_path, monkeypatch):
    """A weights cache holding converted (seeded random) ResNet50V2 weights; downloads off."""
    cache = tmp_path / 'cache'
    monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(cache))
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.manual_seed(3)
    model = timm.create_model('resnet50v2_keras')
    cache.mkdir()
    save_model_dir(model, cache / 'resnet50v2_keras.tf_in1k', label_names=ImageNetInfo().label_names())
    return model


def test_pretrained_true_still_goes_through_our_resolver(seeded_cache, tmp_path, monkeypatch):
    loaded = timm.create_model('resnet50v2_keras', pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), seeded_cache.state_dict().values()))
    # not timm's url loader: with nothing cached and downloads off, our own error, naming the hand conversion
    monkeypatch.setenv('RESNETV2_ZOO_CACHE', str(tmp_path / 'empty'))
    with pytest.raises(WeightsUnavailableError, match='resnetv2-zoo convert'):
        timm.create_model('resnet50v2_keras', pretrained=True)


def test_a_url_of_the_users_own_is_left_to_timm():
    kwargs = dict(pretrained_cfg_overlay=dict(url='https://example.com/mine.pth'))
    assert pretrained_kwargs('resnet50v2_keras', kwargs) is kwargs


# --- item 4: TorchScript of features_only models ---

@pytest.mark.parametrize('arch', ['resnet50v2_keras', 'resnet50_keras'])
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3, 4), (1, 3), (0,), (4,)])
@pytest.mark.slow
def test_torchscript_features_only(arch, out_indices):
    model = timm.create_model(arch, features_only=True, out_indices=out_indices).eval()
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for features in (scripted(x), reloaded(x)):
            assert [f.shape for f in features] == [f.shape for f in expected] and len(expected) == len(out_indices)
            assert all(torch.equal(a, b) for a, b in zip(features, expected))


def test_forward_intermediates_stop_early_unchanged():
    model = timm.create_model('resnet50v2_keras', num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full_final, full = model.forward_intermediates(x)
        assert torch.equal(full_final, model.forward_features(x))  # the last tap is the final features
        _, early = model.forward_intermediates(x, indices=[1, 2], stop_early=True)
    assert len(full) == 5 and all(torch.equal(a, b) for a, b in zip(early, full[1:3]))


# --- item 2: the runner for timm's own scripts ---

FAKE_SCRIPT = ('import sys, json, timm\n'
               "if __name__ == '__main__':\n"
               "    print(json.dumps([sys.argv, timm.is_model('resnet152v2_keras'), sys.path[0]]))\n"
               '    sys.exit(3)\n')


@pytest.mark.parametrize('launcher', [['-m', 'resnetv2_zoo.cli', 'timm'], ['-m', 'resnetv2_zoo.timm_scripts']])
@pytest.mark.slow
def test_runner_runs_the_script_as_main_with_our_models(tmp_path, launcher):
    script = tmp_path / 'benchmark.py'
    script.write_text(FAKE_SCRIPT)
    proc = subprocess.run([sys.executable, *launcher, str(script), '--model', 'resnet50v2_keras', '-b', '2', '--help'],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr  # the script's own exit status
    argv, registered, path0 = json.loads(proc.stdout.splitlines()[-1])
    assert argv == [str(script), '--model', 'resnet50v2_keras', '-b', '2', '--help'] and registered
    assert path0 == str(tmp_path)


@pytest.mark.slow
def test_a_script_run_without_the_runner_does_not_know_our_models(tmp_path):
    """Control for the test above (once for both launchers): the same script run plainly."""
    script = tmp_path / 'benchmark.py'
    script.write_text(FAKE_SCRIPT)
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert json.loads(plain.stdout.splitlines()[-1])[1] is False


def test_runner_without_a_script_says_where_timm_keeps_them(tmp_path, capsys):
    assert cli.main(['timm', str(tmp_path / 'train.py')]) == 2  # in this process: it stops before running anything
    err = capsys.readouterr().err
    assert 'pytorch-image-models' in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def timm_scripts() -> Path:
    if not TIMM_SCRIPTS.parent.is_dir():
        pytest.skip(f'needs the shared directory {TIMM_SCRIPTS.parent}, absent here')
    for name in ('train.py', 'validate.py'):
        assert (TIMM_SCRIPTS / name).is_file(), f'{TIMM_SCRIPTS.parent} is present but {name} is missing'
    return TIMM_SCRIPTS


@pytest.mark.slow
def test_timm_train_one_tiny_epoch_then_validate_and_evaluate(timm_scripts, tmp_path):
    from resnetv2_zoo.train.demo import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / 'data', train_per_class=3, test_per_class=2, size=40)
    # `resnetv2-zoo timm SCRIPT ...` in a child process forked with torch and timm imported (the launchers
    # themselves, from a fresh interpreter, are the test above)
    runner = 'import sys\nfrom resnetv2_zoo.cli import main\nsys.exit(main(["timm", *sys.argv[1:]]))'
    common = ['--data-dir', str(data), '--model', 'resnet50v2_keras', '--num-classes', '4', '--img-size', '32',
              '-b', '4', '--device', 'cpu', '--workers', '0', '--no-prefetcher']
    train = children.run_python(runner, str(timm_scripts / 'train.py'), *common, '--train-split', 'train',
                                '--val-split', 'test', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.01',
                                '--output', str(tmp_path / 'out'), '--experiment', 'tiny', '--log-interval', '1',
                                timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = tmp_path / 'out' / 'tiny' / 'model_best.pth.tar'
    assert checkpoint.is_file()
    validate = children.run_python(runner, str(timm_scripts / 'validate.py'), *common, '--split', 'test',
                                   '--checkpoint', str(checkpoint), '--results-file', str(tmp_path / 'val.json'),
                                   '--results-format', 'json', timeout=600, cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    top1 = json.loads((tmp_path / 'val.json').read_text())['top1']
    # our evaluate reads the same .pth.tar (weights_only=True) and scores the same images alike
    report = resnetv2_zoo.evaluate(str(checkpoint), str(data / 'test'), img_size=32, optimize=False)
    assert report.num_images == 8 and 100 * report.accuracy == pytest.approx(top1, abs=1e-3)
