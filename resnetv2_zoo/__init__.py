"""Keras's ResNet50V2 / 101V2 / 152V2 as exact timm models; importing this registers them with timm."""
from .resnetv2_keras import ResNetV2Keras

__version__ = '0.1.0'
__all__ = ['ResNetV2Keras', '__version__']
