"""The model API, after timm's tests/test_models.py, for the three Keras ResNetV2 depths."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.models.resnetv2_keras import ZeroPadMaxPool2d

MODELS = ['resnet50v2_keras', 'resnet101v2_keras', 'resnet152v2_keras']
# The depths differ only in block counts: `make test-fast` checks the API on 50V2, `make test` on all three.
MODEL_PARAMS = [pytest.param(name, marks=() if name == MODELS[0] else pytest.mark.slow) for name in MODELS]

# keras.applications.ResNet*V2(...).count_params(), which counts BN moving mean and variance too.
KERAS_PARAM_COUNTS = {
    ('resnet50v2_keras', True): 25_613_800,
    ('resnet50v2_keras', False): 23_564_800,
    ('resnet101v2_keras', True): 44_675_560,
    ('resnet152v2_keras', True): 60_380_648,
}
FEATURE_CHANNELS = [64, 256, 512, 1024, 2048]
FEATURE_REDUCTIONS = [2, 4, 8, 16, 32]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _keras_param_count(model: nn.Module) -> int:
    params = sum(p.numel() for p in model.parameters())
    bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(('running_mean', 'running_var')))
    return params + bn_stats


def test_registered_with_timm():
    assert sorted(timm.list_models('*v2_keras')) == sorted(MODELS)  # the v1 models: tests/test_resnet_v1.py


@pytest.mark.parametrize('name, top', KERAS_PARAM_COUNTS.keys())
def test_param_count_equals_keras(name, top):
    model = timm.create_model(name, num_classes=1000 if top else 0)
    assert _keras_param_count(model) == KERAS_PARAM_COUNTS[name, top]


def test_pretrained_cfg():
    for name, top1 in zip(MODELS, ('76.0', '77.2', '78.0')):
        cfg = timm.create_model(name).pretrained_cfg
        assert cfg['tag'] == 'tf_in1k'
        assert cfg['num_classes'] == 1000
        assert cfg['input_size'] == (3, 224, 224) and cfg['test_input_size'] == (3, 299, 299)
        assert cfg['mean'] == cfg['std'] == (0.5, 0.5, 0.5)  # Keras 'tf' preprocessing: x / 127.5 - 1
        assert cfg['first_conv'] == 'stem.conv' and cfg['classifier'] == 'head.fc'
        assert cfg['paper_name'] == 'Identity Mappings in Deep Residual Networks'
        assert cfg['interpolation'] and cfg['crop_pct'] and cfg['license']
        assert top1 in cfg['notes'][0] and '299' in cfg['notes'][0]


def test_stage_shapes_at_224():
    """stem 112 -> pool 56 -> conv2 28 -> conv3 14 -> conv4 7 -> conv5 7, as Keras."""
    model = timm.create_model('resnet50v2_keras').eval()
    shapes = {}
    names = ['stem.conv', 'stem.pool'] + [f'stages.{i}' for i in range(4)]
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert [shapes[n] for n in names] == [
        (64, 112, 112), (64, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7), (2048, 7, 7)]


@pytest.mark.parametrize('name', MODEL_PARAMS)
@pytest.mark.parametrize('size', [32, 97, 160])
def test_forward_sizes(name, size):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', MODEL_PARAMS)
@pytest.mark.slow
def test_default_cfg_consistency(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg['input_size']))
        assert feats.shape[1] == model.num_features
        assert tuple(feats.shape[-2:]) == cfg['pool_size']
        test_feats = model.forward_features(torch.randn(1, *cfg['test_input_size']))
        assert tuple(test_feats.shape[-2:]) == cfg['test_pool_size']
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        assert model.get_submodule(cfg['first_conv']).in_channels == 3
        assert model.get_submodule(cfg['classifier']) is model.get_classifier()

        model.reset_classifier(0)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features, 2, 2)
        model.reset_classifier(7, 'max')
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.slow
def test_global_pool_like_keras_pooling():
    x = torch.randn(2, 3, 96, 96)
    feats = timm.create_model('resnet50v2_keras', num_classes=0, global_pool='').eval()
    avg = timm.create_model('resnet50v2_keras', num_classes=0, global_pool='avg').eval()
    mx = timm.create_model('resnet50v2_keras', num_classes=0, global_pool='max').eval()
    avg.load_state_dict(feats.state_dict())
    mx.load_state_dict(feats.state_dict())
    with torch.no_grad():
        fmap = feats(x)
        assert fmap.shape == (2, 2048, 3, 3)
        torch.testing.assert_close(avg(x), fmap.mean((2, 3)))
        torch.testing.assert_close(mx(x), fmap.amax((2, 3)))
        avg.reset_classifier(0, 'fast')  # what timm's benchmark.py --gp fast asks for
        torch.testing.assert_close(avg(x), fmap.mean((2, 3)))


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == FEATURE_CHANNELS
    assert model.feature_info.reduction() == FEATURE_REDUCTIONS
    size = 224 if name == 'resnet50v2_keras' else 128
    with torch.no_grad():
        feats = model(torch.randn(1, 3, size, size))
    for f, c, r in zip(feats, FEATURE_CHANNELS, FEATURE_REDUCTIONS):
        assert f.shape == (1, c, size // r, size // r)


@pytest.mark.slow
def test_features_only_out_indices_and_fx():
    """The getter (default) and timm's FX extractor agree; the last tap is post_bn + relu (Keras `post_relu`)."""
    def create(**kwargs):
        torch.manual_seed(0)  # the same initial weights in each wrapper
        return timm.create_model('resnet50v2_keras', **kwargs).eval()

    full = create()
    getter = create(features_only=True, out_indices=(1, 3, 4))
    fx = create(features_only=True, out_indices=(1, 3, 4), feature_cls='fx')
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b, expected_last = getter(x), fx(x), full.forward_features(x)
    assert [t.shape[1] for t in a] == [256, 1024, 2048]
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb)
    torch.testing.assert_close(a[-1], expected_last)
    assert (a[-1] >= 0).all()


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        out, inters = model.forward_intermediates(x)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(out, features)
    torch.testing.assert_close(inters[-1], features)
    assert [t.shape[1] for t in inters] == FEATURE_CHANNELS
    for t, r in zip(inters, FEATURE_REDUCTIONS):
        assert t.shape[-1] == math.ceil(97 / r)
    assert len(only) == 2
    torch.testing.assert_close(only[0], inters[3])


def test_forward_intermediates_stop_early_and_prune():
    model = timm.create_model('resnet50v2_keras').eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        _, all_inters = model.forward_intermediates(x)
        last, early = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        torch.testing.assert_close(last, all_inters[2])
        torch.testing.assert_close(early[1], all_inters[2])

        taken = model.prune_intermediate_layers([1, 2])
        assert taken == [1, 2]
        assert len(model.stages) == 2 and len(model.stages[1].blocks) == 3
        assert model.num_features == 512
        pruned_out, pruned = model.forward_intermediates(x, indices=[1, 2])
        torch.testing.assert_close(pruned[0], all_inters[1])
        torch.testing.assert_close(pruned[1], all_inters[2])
        torch.testing.assert_close(model.forward_features(x), all_inters[2])
        torch.testing.assert_close(pruned_out, all_inters[2])


def test_grad_checkpointing_same_output():
    model = timm.create_model('resnet50v2_keras', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    expected = model(x)
    model.set_grad_checkpointing()
    assert all(s.grad_checkpointing for s in model.stages)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_matcher_covers_every_parameter():
    model = timm.create_model('resnet50v2_keras')
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [n for names in groups.values() for n in names]
        assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())


# TorchScript, FX and dynamo (one graph, no breaks; the eager-backend AOT path keeps this fast, and
# Inductor is exercised in tests/test_inference.py).
EXPORTERS = {
    'torchscript': torch.jit.script,
    'fx': torch.fx.symbolic_trace,
    'compile_fullgraph': lambda model: torch.compile(model, backend='aot_eager', fullgraph=True),
}


@pytest.mark.parametrize('exporter', [pytest.param(name, marks=pytest.mark.slow if name == 'compile_fullgraph' else ())
                                      for name in EXPORTERS])
def test_exported_model_matches_eager(exporter):
    model = timm.create_model('resnet50v2_keras', num_classes=10).eval()
    exported = EXPORTERS[exporter](model)
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_channels_last():
    model = timm.create_model('resnet50v2_keras', num_classes=10).eval()
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_in_chans():
    model = timm.create_model('resnet50v2_keras', in_chans=1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


@pytest.mark.slow
def test_drop_path_and_drop_rate():
    model = timm.create_model('resnet50v2_keras', drop_path_rate=0.2, drop_rate=0.5, num_classes=5)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks if hasattr(b.drop_path, 'drop_prob')]
    assert len(rates) == 15 and rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    assert model.head.drop.p == 0.5
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize('kwargs, message', [
    (dict(global_pool='mean'), 'global_pool'),
    (dict(num_classes=-1), 'num_classes'),
    (dict(in_chans=0), 'in_chans'),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('resnet50v2_keras', **kwargs)


def test_reset_classifier_bad_pool():
    model = timm.create_model('resnet50v2_keras')
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(10, 'median')


def test_stem_pool_pads_with_zeros_not_minus_inf():
    """On a negative input the border windows see Keras's zero padding; nn.MaxPool2d would see -inf."""
    x = -torch.rand(1, 2, 9, 9) - 1
    ours = ZeroPadMaxPool2d(3, stride=2, padding=1)(x)
    torch_pool = nn.MaxPool2d(3, stride=2, padding=1)(x)
    assert ours.shape == torch_pool.shape == (1, 2, 5, 5)
    assert (ours[..., 0, :] == 0).all() and (ours[..., :, -1] == 0).all()
    assert (torch_pool < 0).all()
    # windows that touch no padding are plain max pools (shifted by the one-pixel pad)
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], nn.functional.max_pool2d(x[..., 1:, 1:], 3, 2))


def test_strided_shortcut_is_keras_one_by_one_max_pool():
    """Keras's `MaxPooling2D(1, stride)` shortcut is a plain subsample; check it on odd sizes too."""
    model = timm.create_model('resnet50v2_keras').eval()
    block = model.stages[0].blocks[-1]
    assert block.downsample is None and block.stride == 2
    captured = {}
    block.register_forward_hook(lambda m, i, o: captured.update(x=i[0], out=o))
    with torch.no_grad():
        model(torch.randn(1, 3, 99, 99))
        x = captured['x']
        residual = block.conv3(block.norm3(block.conv2(block.norm2(block.conv1(block.norm1(x))))))
        torch.testing.assert_close(captured['out'], residual + nn.functional.max_pool2d(x, 1, 2))


def _undrawn(model: nn.Module):
    """Layers whose weights are not what `init_weights` draws: He normal (fan_out) for a conv with a zero bias,
    N(0, 0.01) for a Linear with a zero bias (each conv holds at least 4,096 weights: its std is within 5%)."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            expected = (math.sqrt(2 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1]))
                        if isinstance(m, nn.Conv2d) else 0.01)
            w = m.weight.detach()
            if not (torch.isfinite(w).all() and abs(w.std().item() / expected - 1) < 0.05
                    and abs(w.mean().item()) < 0.05 * expected):
                found.append(name)
            if m.bias is not None and torch.count_nonzero(m.bias):
                found.append(f'{name}.bias')
    return found


@pytest.mark.parametrize('name', ['resnet50v2_keras', 'resnet50_keras'])
def test_every_conv_is_drawn_once_by_init_weights(name):
    """The convs are built without PyTorch's default initialisation (`models.resnetv2_keras.conv2d`, memory left
    as it is), which `init_weights` drew again anyway: every one must still be drawn."""
    model = timm.create_model(name, num_classes=1000)
    assert _undrawn(model) == []
    again = timm.create_model(name, num_classes=1000)  # a second build does not reuse the first's numbers
    assert not torch.equal(model.stem.conv.weight, again.stem.conv.weight)
    # control: a conv left as it was built, and a layer with PyTorch's default init, are found
    with torch.no_grad():
        model.stages[1].blocks[0].conv2.weight.zero_()
        model.head.fc.reset_parameters()
    assert _undrawn(model) == ['stages.1.blocks.0.conv2', 'head.fc', 'head.fc.bias']
