"""Loading without random initialisation: `load_model` and the converter build a model on the meta device and copy
the weights into uninitialised memory when the weights fill every tensor, and through timm's pretrained loading
otherwise. Both ways must give the same model, bit for bit; no tensor may be left uninitialised."""
from pathlib import Path
from typing import Any, List

import pytest
import safetensors.torch
import timm
import torch

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.weights import checkpoint
from resnetv2_zoo.weights.checkpoint import create_loaded, load_model, save_model_dir, save_weights_file

ARCH = 'resnet50v2_keras'


def _trained_like(num_classes: int = 3, **kwargs: Any) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh one's, BatchNorm statistics and step counters included."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                tensor.fill_(7)
            elif name.endswith('running_var'):
                tensor.uniform_(0.5, 2.0)
            else:
                tensor.uniform_(-0.5, 0.5)
    return model.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def timm_calls(monkeypatch) -> List[dict]:
    """The keyword arguments of every timm.create_model call the checkpoint module makes."""
    calls: List[dict] = []
    create = timm.create_model

    def spy(*args: Any, **kwargs: Any) -> torch.nn.Module:
        calls.append(dict(kwargs, meta=torch.empty(0).device.type == 'meta'))
        return create(*args, **kwargs)
    monkeypatch.setattr(checkpoint.timm, 'create_model', spy)
    return calls


@pytest.mark.parametrize('layout', ['dir', 'file'])
def test_a_complete_checkpoint_loads_without_initialising_and_equals_timms_load(layout, tmp_path: Path, timm_calls):
    model = _trained_like()
    if layout == 'dir':
        path = save_model_dir(model, tmp_path / 'model')
        name, kwargs = f'local-dir:{path}', {}
    else:
        path = save_weights_file(model, tmp_path / 'model.safetensors')
        name, kwargs = ARCH, dict(num_classes=3, pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    timm_calls.clear()
    loaded = load_model(path)
    assert timm_calls and all(c['meta'] for c in timm_calls)  # shapes and the build: nothing initialised
    assert not any(c.get('pretrained') for c in timm_calls)
    _same(loaded, model)
    by_timm = timm.create_model(name, pretrained=True, **kwargs)  # control: timm's own pretrained loading
    _same(loaded, by_timm)
    assert {k: v for k, v in loaded.pretrained_cfg.items()} == {k: v for k, v in by_timm.pretrained_cfg.items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), by_timm.eval()(x))


def test_a_new_head_goes_through_timm_and_is_initialised(tmp_path: Path, timm_calls):
    model = _trained_like()
    path = save_model_dir(model, tmp_path / 'model')
    reheaded = load_model(path, num_classes=5)
    assert timm_calls[-1].get('pretrained') is True and not timm_calls[-1]['meta']
    state, stored = reheaded.state_dict(), model.state_dict()
    assert all(torch.equal(state[k], stored[k]) for k in stored if not k.startswith('head.fc'))
    head = state['head.fc.weight']
    assert head.shape == (5, 2048) and torch.isfinite(head).all() and 0 < head.abs().max() < 1  # timm's init


def test_a_file_without_step_counters_takes_timms_way_and_counts_from_zero(tmp_path: Path, timm_calls):
    """BatchNorm step counters may be absent; torch then keeps the model's own, which uninitialised memory would
    not have, so such a file is not loaded the fast way."""
    model = _trained_like()
    path = save_model_dir(model, tmp_path / 'model')
    weights = path / 'model.safetensors'
    tensors = safetensors.torch.load_file(str(weights))
    metadata = checkpoint.read_weights_metadata(weights)
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.endswith('num_batches_tracked')},
                                str(weights), metadata=metadata)
    loaded = load_model(path)
    assert timm_calls[-1].get('pretrained') is True
    counters = {k: v for k, v in loaded.state_dict().items() if k.endswith('num_batches_tracked')}
    assert counters and all(int(v) == 0 for v in counters.values())


def test_create_loaded_fills_every_tensor_or_names_what_is_missing():
    model = _trained_like(num_classes=4)
    _same(create_loaded(ARCH, model.state_dict(), num_classes=4), model)
    incomplete = {k: v for k, v in model.state_dict().items() if k != 'head.fc.bias'}
    with pytest.raises(RuntimeError, match='Missing key.*head.fc.bias'):
        create_loaded(ARCH, incomplete, num_classes=4)


def test_a_non_persistent_buffer_is_not_left_uninitialised():
    """Control for the completeness rule: a tensor no state dict holds means the usual, initialised build."""
    module = torch.nn.Linear(2, 2)
    shapes = {'weight': (2, 2), 'bias': (2,)}
    assert checkpoint._filled_by(module, shapes)
    assert not checkpoint._filled_by(module, {'weight': (2, 3), 'bias': (2,)})  # a shape that differs
    module.register_buffer('scale', torch.ones(2), persistent=False)
    assert not checkpoint._filled_by(module, shapes)


def test_a_constructor_that_needs_real_tensors_loads_the_usual_way(tmp_path: Path, monkeypatch):
    """A timm model whose constructor fails on the meta device (some compute with their weights) is built for real."""
    model = _trained_like()
    path = save_model_dir(model, tmp_path / 'model')
    create = timm.create_model
    real_builds: List[dict] = []

    def no_meta(*args: Any, **kwargs: Any) -> torch.nn.Module:
        if torch.empty(0).device.type == 'meta':
            raise RuntimeError('Tensor.item() cannot be called on meta tensors')
        real_builds.append(kwargs)
        return create(*args, **kwargs)
    monkeypatch.setattr(checkpoint.timm, 'create_model', no_meta)
    checkpoint._model_shapes.cache_clear()  # its own meta build must meet the failure too
    _same(load_model(path), model)
    assert real_builds and real_builds[-1].get('pretrained') is True
    _same(create_loaded(ARCH, model.state_dict(), num_classes=3), model)
