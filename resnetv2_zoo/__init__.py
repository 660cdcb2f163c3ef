"""Keras's ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2 as exact timm models; importing this registers them.

Layers, one way: `cli` -> `train` -> `weights` -> `keras` (spec, files), and `weights` -> `models`
-> `keras.spec`. The models reach the converted pretrained weights through a hook set here.
"""
__version__ = '0.1.0'

from .models.resnet_keras import ResNetKeras  # noqa: E402  (registers the v1 models)
from .models.resnetv2_keras import ResNetV2Keras, set_pretrained_hook  # noqa: E402  (registers the models)
from .weights.pretrained import pretrained_kwargs  # noqa: E402

set_pretrained_hook(pretrained_kwargs)  # both model families

# The Python API (see `api.py`), loaded on first use so that `import resnetv2_zoo` only registers the models.
_API_NAMES = ('convert', 'decode_predictions', 'demo', 'evaluate', 'export', 'finetune', 'load_model',
              'predict')


def __getattr__(name: str):
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_API_NAMES))


__all__ = ['ResNetKeras', 'ResNetV2Keras', '__version__', *_API_NAMES]
