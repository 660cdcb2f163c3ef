"""Keras's ResNet50V2 / 101V2 / 152V2 as exact timm models; importing this registers them with timm.

Layers, one way: `cli` -> `train` -> `weights` -> `keras` (spec, files), and `weights` -> `models`
-> `keras.spec`. The models reach the converted pretrained weights through a hook set here.
"""
__version__ = '0.1.0'

from .models.resnetv2_keras import ResNetV2Keras, set_pretrained_hook  # noqa: E402  (registers the models)
from .weights.pretrained import pretrained_kwargs  # noqa: E402

set_pretrained_hook(pretrained_kwargs)

__all__ = ['ResNetV2Keras', '__version__']
