"""The private timm API wrappers: timm's own function where it fits, our fallback where it is gone or changed.

Both paths are exercised on the installed timm, so the fallback is tested even though it is not used here:
the fallback must give what timm gives (indices) or a config that loads back to the same model (config.json).
"""
import json
from pathlib import Path

import pytest
import timm
import torch

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo import _timm_compat
from resnetv2_zoo.weights.checkpoint import WEIGHTS_NAME, load_model, save_weights_file

ARCH = 'resnet50v2_keras'


@pytest.mark.parametrize('indices', [None, 1, 3, 5, [0], [0, 2, 4], [-1], [-5, -2], (1, 3)])
def test_fallback_feature_take_indices_matches_timm(indices):
    if _timm_compat._timm_feature_take_indices is None:
        pytest.fail('timm.models._features.feature_take_indices is gone from the tested timm: update the pin')
    assert _timm_compat._feature_take_indices(5, indices) == _timm_compat._timm_feature_take_indices(5, indices)
    assert _timm_compat.feature_take_indices(5, indices) == _timm_compat._feature_take_indices(5, indices)


@pytest.mark.parametrize('indices, message', [(0, r'last-n \(0\) is out of range'), (6, 'out of range'),
                                              ([5], r'feature index 5 is out of range'), ([-6], 'out of range')])
def test_fallback_feature_take_indices_refuses_like_timm(indices, message):
    for fn in (_timm_compat._feature_take_indices, _timm_compat._timm_feature_take_indices):
        with pytest.raises(AssertionError, match=message):
            fn(5, indices)


def test_forward_intermediates_without_the_private_timm_function(monkeypatch):
    """The model's feature API works on the fallback alone, with the same outputs."""
    model = timm.create_model(ARCH, num_classes=0).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        monkeypatch.setattr(_timm_compat, '_timm_feature_take_indices', None)
        fallback = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert len(fallback) == 2 and all(torch.equal(a, b) for a, b in zip(fallback, expected))


def _model_dir(model: torch.nn.Module, directory: Path, labels) -> Path:
    """A model directory as checkpoint.save_model_dir writes it, the config through the compat wrapper."""
    directory.mkdir()
    save_weights_file(model, directory / WEIGHTS_NAME, labels)
    model_config = {'label_names': list(labels)}
    _timm_compat.save_config_for_hf(model, directory / 'config.json', model_config=model_config)
    assert model_config == {'label_names': list(labels)}  # the caller's dict is left as it was
    return directory


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    """timm's own tiny test ResNet: the config writer is the same for every timm model, and this one is fast."""
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=3, global_pool='max').eval()


def test_fallback_config_loads_back_like_timms(model, tmp_path, monkeypatch):
    labels = ['a', 'b', 'c']
    with_timm = json.loads((_model_dir(model, tmp_path / 'timm', labels) / 'config.json').read_text())
    monkeypatch.setattr(_timm_compat, '_timm_save_config_for_hf', None)
    fallback_dir = _model_dir(model, tmp_path / 'fallback', labels)
    fallback = json.loads((fallback_dir / 'config.json').read_text())
    for key in ('architecture', 'num_classes', 'num_features', 'global_pool', 'label_names'):
        assert fallback[key] == with_timm[key], key
    for key in ('mean', 'std', 'input_size', 'crop_pct', 'interpolation', 'first_conv', 'classifier'):
        assert fallback['pretrained_cfg'][key] == with_timm['pretrained_cfg'][key], key
    assert not {'url', 'file', 'hf_hub_id', 'source'} & set(fallback['pretrained_cfg'])
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        loaded = load_model(fallback_dir).eval()  # timm.create_model('local-dir:...')
        assert list(loaded.pretrained_cfg['label_names']) == labels
        assert torch.equal(loaded(x), expected)


def _timm_1_0_29_signature(model, config_path, model_config=None, model_args=None):
    """timm 1.0.20-1.0.30: no data_config; pops from model_config; needs a Path."""
    model_config.pop('label_names')
    config_path.write_text(json.dumps({'called': 'old'}))


def _moved_signature(model, *, path, config=None):
    raise AssertionError('must not be called: it does not take (model, path, model_config=...)')


def test_save_config_calls_timm_with_either_signature_or_falls_back(model, tmp_path, monkeypatch):
    monkeypatch.setattr(_timm_compat, '_timm_save_config_for_hf', _timm_1_0_29_signature)
    labels = {'label_names': ['a', 'b', 'c']}
    _timm_compat.save_config_for_hf(model, str(tmp_path / 'old.json'), model_config=labels)
    assert json.loads((tmp_path / 'old.json').read_text()) == {'called': 'old'}
    assert labels == {'label_names': ['a', 'b', 'c']}

    monkeypatch.setattr(_timm_compat, '_timm_save_config_for_hf', _moved_signature)
    _timm_compat.save_config_for_hf(model, tmp_path / 'moved.json', model_config=labels)
    assert json.loads((tmp_path / 'moved.json').read_text())['label_names'] == ['a', 'b', 'c']  # the fallback's


def test_package_uses_private_timm_api_only_through_the_wrapper():
    """One place: no other module imports timm's underscored modules."""
    package = Path(resnetv2_zoo.__file__).parent
    private = ('timm.models._', 'timm.layers._', 'from timm._', 'import timm._')
    offenders = [str(p.relative_to(package)) for p in package.rglob('*.py')
                 if p.name != '_timm_compat.py' and any(s in p.read_text() for s in private)]
    assert offenders == []
