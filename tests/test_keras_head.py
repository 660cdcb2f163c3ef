"""The model side of issue 11, without Keras: the MLP head in timm's API, BatchNorm eps, the recorded output activation
(predict's sigmoid), and the model arguments and data config surviving both checkpoint layouts."""
import json

import pytest
import timm
import torch
from PIL import Image

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.models.keras_head import KerasMlpHead
from resnetv2_zoo.train.predict import predict
from resnetv2_zoo.weights.checkpoint import (
    inspect_checkpoint,
    load_model,
    output_activation,
    save_model_dir,
    save_weights_file,
    set_output_activation,
)
from resnetv2_zoo.weights.decode import probabilities, top_k_labels

ARGS = dict(num_classes=3, global_pool='max', bn_eps=1e-3, head_hidden=[16, 8], head_act=['relu', 'tanh'])


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('resnet50v2_keras', **ARGS).eval()
    with torch.no_grad():  # BN statistics away from identity, so eps and the head matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # small variances, so eps matters; gamma keeps the scale
                m.running_var.uniform_(1e-3, 1e-2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.weight.copy_((m.running_var + 1e-3).sqrt())
            elif isinstance(m, torch.nn.Linear):  # timm's init (std 0.01, zero bias) makes a tiny head
                m.weight.normal_(0, m.in_features ** -0.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize('arch', ['resnet50v2_keras', 'resnet50_keras'])
def test_mlp_head_in_timms_api(arch):
    model = timm.create_model(arch, **ARGS).eval()
    assert isinstance(model.head, KerasMlpHead)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    x = torch.rand(2, 3, 64, 64)
    features = model.forward_features(x)
    assert model(x).shape == (2, 3)
    assert model.forward_head(features, pre_logits=True).shape == (2, 8) and model.head_hidden_size == 8
    hidden = model.head.hidden[0].weight.clone()
    model.reset_classifier(5)  # a new classifier, the hidden layers kept (as timm's NormMlpClassifierHead)
    assert model(x).shape == (2, 5) and torch.equal(model.head.hidden[0].weight, hidden)
    model.reset_classifier(0, '')  # no head at all: the feature map
    assert model(x).shape == features.shape
    # control: the default model is the keras.applications one
    default = timm.create_model(arch, num_classes=3)
    assert {m.eps for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1.001e-5}
    assert not isinstance(default.head, KerasMlpHead)


def test_mlp_head_computes_pool_dense_act_dense(model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_features(x).amax(dim=(2, 3))
        h = torch.relu(model.head.hidden[0](pooled))
        h = torch.tanh(model.head.hidden[2](h))
        expected = model.head.fc(h)
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert not torch.allclose(model(x), model.head.fc(model.head.hidden[2](model.head.hidden[0](pooled))),
                                  atol=1e-3)  # control: without the activations


def test_bn_eps_changes_outputs(model):
    x = torch.rand(1, 3, 64, 64)
    other = timm.create_model('resnet50v2_keras', **{**ARGS, 'bn_eps': 1.001e-5}).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(x)
        assert (out - other(x)).abs().max() > 0.05 * out.abs().max()


@pytest.mark.parametrize('layout', ['dir', 'file'])
def test_model_args_activation_and_data_config_survive(model, tmp_path, layout):
    set_output_activation(model, 'sigmoid')
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, input_size=(3, 64, 64))
    out = tmp_path / ('model' if layout == 'dir' else 'model.safetensors')
    (save_model_dir if layout == 'dir' else save_weights_file)(model, out, ['a', 'b', 'c'])
    info = inspect_checkpoint(out)
    assert info.output_activation == 'sigmoid'
    if layout == 'dir':
        config = json.loads((out / 'config.json').read_text())
        assert config['output_activation'] == 'sigmoid' and config['model_args']['head_hidden'] == [16, 8]
    loaded = load_model(out).eval()
    assert output_activation(loaded) == 'sigmoid'
    assert loaded.pretrained_cfg['input_size'] == (3, 64, 64) and tuple(loaded.pretrained_cfg['std']) == (1 / 255,) * 3
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a new head is a new classifier: trained with softmax, it does not inherit the sigmoid
    assert output_activation(load_model(out, num_classes=2)) == 'softmax'


def test_predict_applies_the_recorded_activation(model, tmp_path):
    image = tmp_path / 'x.png'
    Image.new('RGB', (64, 64), (120, 30, 200)).save(image)
    scores = {}
    for activation in ('sigmoid', 'softmax'):
        set_output_activation(model, activation)
        save_model_dir(model, tmp_path / activation, ['a', 'b', 'c'])
        result = predict(str(tmp_path / activation), [str(image)], top_k=3, device='cpu', img_size=64, optimize=False)
        scores[activation] = dict(result.predictions[0].top)
    # the sigmoid scores are per class; their logits, through softmax, give the softmax model's scores
    logits = torch.tensor([[scores['sigmoid'][c] for c in 'abc']]).logit()
    expected = logits.softmax(dim=1)[0]
    assert torch.allclose(torch.tensor([scores['softmax'][c] for c in 'abc']), expected, atol=1e-4)
    assert abs(sum(scores['softmax'].values()) - 1) < 1e-5
    assert abs(sum(scores['sigmoid'].values()) - 1) > 1e-3  # control: not softmax
    assert torch.allclose(probabilities(torch.tensor([[0.0]]), 'sigmoid'), torch.tensor([[0.5]]))
    assert top_k_labels(torch.tensor([[2.0, -1.0]]), ['a', 'b'], 1, 'sigmoid')[0][0][0] == 'a'
