"""`resnetv2-zoo export` / `resnetv2_zoo.export`: ONNX and `.pt2` exports, checked against eager before success.

A tiny ResNetV2Keras (same code, 8 channels) keeps the exports to seconds; the command runs once end to
end on a real ResNet50V2 model directory (slow).
"""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch

from resnetv2_zoo.cli import main
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.models.resnetv2_keras import ResNetV2Keras
from resnetv2_zoo.weights import export as export_module
from resnetv2_zoo.weights.checkpoint import save_model_dir
from resnetv2_zoo.weights.export import EXPORT_TOLERANCE, MIN_ONNX_OPSET, export_model, is_own_export

SIZE = (3, 64, 64)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ResNetV2Keras(layers=(2, 2, 2, 2), channels=(8, 8, 8, 8), stem_chs=8, num_classes=5).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them (ONNX, ORT) is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith('.'))


@pytest.mark.slow
def test_onnx_export_dynamic_batch_matches_eager_in_onnxruntime(tmp_path):
    model = tiny_model()
    out = tmp_path / 'model.onnx'
    result = export_model(model, out, input_size=SIZE, dynamic_batch=True)
    assert result.path == out and result.format == 'onnx' and result.opset >= MIN_ONNX_OPSET
    assert result.max_abs_diff <= result.tolerance
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) >= MIN_ONNX_OPSET
    assert json.loads({p.key: p.value for p in proto.metadata_props}['resnetv2_zoo'])['producer'] == 'resnetv2-zoo'
    assert not (tmp_path / 'model.onnx.data').exists() and leftovers(tmp_path) == []  # one file, no temporaries
    # independently of the exporter's own check: other batch sizes, another input
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for batch in (1, 5):
        x = torch.rand(batch, *SIZE, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        with torch.no_grad():
            eager = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == eager.shape
        assert (got - eager).abs().max() <= EXPORT_TOLERANCE * max(1.0, float(eager.abs().max()))
        assert eager.abs().max() > 1e-3  # control: not vacuously close to zero outputs


def test_onnx_fixed_batch_refuses_other_batch_sizes(tmp_path):
    out = export_model(tiny_model(), tmp_path / 'fixed.onnx', input_size=SIZE, check_batch=2).path
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    assert session.run(None, {name: np.zeros((2, *SIZE), np.float32)})[0].shape == (2, 5)
    with pytest.raises(Exception, match='[Dd]imension'):  # onnxruntime's own error types are not importable
        session.run(None, {name: np.zeros((3, *SIZE), np.float32)})


def test_pt2_export_loads_back_and_matches(tmp_path):
    model = tiny_model()
    out = tmp_path / 'model.pt2'
    result = export_model(model, out, input_size=SIZE, dynamic_batch=True)
    assert result.format == 'pt2' and result.max_abs_diff <= result.tolerance and is_own_export(out)
    program = torch.export.load(str(out))
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_replaces_only_its_own_exports(tmp_path):
    foreign = tmp_path / 'model.onnx'
    foreign.write_bytes(b'not ours')
    with pytest.raises(ResNetV2ZooError, match='not an export resnetv2-zoo wrote'):
        export_model(tiny_model(), foreign, input_size=SIZE)
    assert foreign.read_bytes() == b'not ours' and leftovers(tmp_path) == []
    # an ONNX file from another exporter is not ours either
    other = tmp_path / 'other.onnx'
    torch.onnx.export(tiny_model(), (torch.randn(1, *SIZE),), str(other), dynamo=True, external_data=False)
    before = other.read_bytes()
    with pytest.raises(ResNetV2ZooError, match='not an export resnetv2-zoo wrote'):
        export_model(tiny_model(), other, input_size=SIZE)
    assert other.read_bytes() == before
    # our own previous export is replaced
    ours = tmp_path / 'ours.pt2'
    export_model(tiny_model(seed=0), ours, input_size=SIZE)
    first = ours.read_bytes()
    export_model(tiny_model(seed=1), ours, input_size=SIZE)
    assert ours.read_bytes() != first and is_own_export(ours)


def test_an_export_that_disagrees_with_eager_is_not_written(tmp_path, monkeypatch):
    runner = export_module._onnx_runner
    monkeypatch.setattr(export_module, '_onnx_runner', lambda path: (lambda x: runner(path)(x) + 1e-2))
    out = tmp_path / 'model.onnx'
    with pytest.raises(ResNetV2ZooError, match='differs from the eager model'):
        export_model(tiny_model(), out, input_size=SIZE)
    assert os.listdir(tmp_path) == []  # nothing, not even a temporary


@pytest.mark.parametrize('name, message', [('model.tflite', 'unknown export format'),
                                           ('missing/model.onnx', 'does not exist')])
def test_bad_outputs_are_refused(tmp_path, name, message):
    with pytest.raises(ResNetV2ZooError, match=message):
        export_model(tiny_model(), tmp_path / name, input_size=SIZE)


def test_old_opset_is_refused_before_loading(tmp_path, capsys):
    assert main(['export', 'no-such-model-dir', '-o', str(tmp_path / 'm.onnx'), '--opset', '13']) == 2
    assert 'opset 17 or newer' in capsys.readouterr().err and os.listdir(tmp_path) == []


@pytest.mark.slow(seconds=6)
def test_export_command_on_a_model_directory(tmp_path, capsys):
    """The command on a whole ResNet50V2 checkpoint. (The Python API's `.pt2` of a model directory runs in
    README's export snippet, test_readme_snippets; a `.pt2` loaded back, in test_pt2_export_loads_back_and_matches.)"""
    model = timm.create_model('resnet50v2_keras', num_classes=3)
    model_dir = save_model_dir(model, tmp_path / 'model', label_names=['a', 'b', 'c'])
    assert main(['export', str(model_dir), '-o', str(tmp_path / 'm.onnx'), '--dynamic-batch', '--img-size', '64']) == 0
    assert 'wrote' in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 64)
    session = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]  # --img-size
    with torch.no_grad():
        eager = model.eval()(x)
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (onnx_out - eager).abs().max() <= EXPORT_TOLERANCE * max(1.0, float(eager.abs().max()))
