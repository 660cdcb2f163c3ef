"""`optimize_for_inference`: the folded (and compiled) model computes what the eager model does."""
import pytest
import timm
import torch

from resnetv2_zoo import ResNetV2Keras
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.models.optimize import fold_batchnorms, optimize_for_inference
from resnetv2_zoo.weights.verify import parity_tolerance


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms: freshly built ones fold to the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= parity_tolerance(expected)


@pytest.fixture(scope='module')
def resnet50() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(timm.create_model('resnet50v2_keras'))


def tiny_model(**kwargs) -> ResNetV2Keras:
    torch.manual_seed(1)
    return randomize_batchnorms(ResNetV2Keras(layers=(2, 2, 2, 2), channels=(8, 8, 16, 16), stem_chs=8, **kwargs))


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('size', [(224, 224), (37, 61)])
@pytest.mark.slow
def test_optimized_matches_eager(resnet50, channels_last, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    optimized = optimize_for_inference(resnet50, channels_last=channels_last)
    with torch.no_grad():
        expected = resnet50(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert_close(optimized(x), expected)


def test_folds_every_norm_that_follows_a_conv(resnet50):
    optimized = optimize_for_inference(resnet50)
    norms = [name for name, m in optimized.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # per block only norm1 (pre-activation of the residual sum) remains, plus the final norm
    assert norms == [f'stages.{s}.blocks.{b}.norm1' for s, depth in enumerate((3, 4, 6, 3)) for b in range(depth)] + [
        'norm']
    assert all(isinstance(b.norm2, torch.nn.ReLU) and isinstance(b.norm3, torch.nn.ReLU)
               for b in optimized.modules() if hasattr(b, 'norm3'))
    assert not optimized.training and not any(p.requires_grad for p in optimized.parameters())


def test_original_model_untouched(resnet50):
    before = {k: v.clone() for k, v in resnet50.state_dict().items()}
    optimize_for_inference(resnet50)
    after = resnet50.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_deterministic(resnet50):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    first, second = optimize_for_inference(resnet50), optimize_for_inference(resnet50)
    with torch.no_grad():
        assert torch.equal(first(x), first(x))
        assert torch.equal(first(x), second(x))


@pytest.mark.slow(seconds=25)
def test_compiled_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))  # Inductor's cache, in this test's folder, not /tmp
    model = tiny_model(num_classes=10)
    x = torch.randn(3, 3, 45, 33, generator=torch.Generator().manual_seed(4))
    compiled = optimize_for_inference(model, channels_last=True, compile=True)
    with torch.no_grad():
        expected = model(x)
        x = x.contiguous(memory_format=torch.channels_last)
        out = compiled(x)
        assert_close(out, expected)
        assert torch.equal(compiled(x), out)
    assert not torch._inductor.config.freezing  # switched on around the calls only, not for the whole process


def test_refuses_training_mode_and_other_models():
    with pytest.raises(ResNetV2ZooError, match='eval mode'):
        fold_batchnorms(tiny_model().train())
    with pytest.raises(ResNetV2ZooError, match='needs a ResNetV2Keras, got ResNetV2'):
        optimize_for_inference(timm.create_model('resnetv2_50'))
