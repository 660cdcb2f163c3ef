"""Where the official Keras ImageNet weights live, as the `url` of each `*_keras` model's pretrained cfg.

timm counts a pretrained cfg as having weights (`timm.list_pretrained`, `timm.is_model_pretrained`) when
it names a `url`, `file` or `hf_hub_id`. The Keras URL is the truthful one of these, and a constant: the
registry is filled at import without touching the network or the disk. timm never fetches it itself:
`pretrained=True` goes through the package's hook (`weights.pretrained.pretrained_kwargs`), which sees
this URL as "the official weights", fetches and converts them once, and hands timm the converted
`model.safetensors` as the cfg's `file`, which timm loads before any `url`.

Both model families (`resnetv2_keras.py`, `resnet_keras.py`) build their cfgs with `keras_weights_url`.
"""
from typing import Optional

from ..keras.spec import KERAS_RESNETS, KERAS_WEIGHTS_URL

__all__ = ['keras_weights_url', 'is_keras_weights_url']


def keras_weights_url(arch: str, include_top: bool = True) -> str:
    """The published URL of the official Keras weights of timm architecture `arch` (e.g. 'resnet50v2_keras')."""
    return KERAS_WEIGHTS_URL + KERAS_RESNETS[arch].weights_file_name(include_top)


def is_keras_weights_url(url: Optional[str]) -> bool:
    """Whether a pretrained cfg's `url` is one of the official Keras weight files (ours to resolve, not timm's)."""
    return bool(url) and any(url in (keras_weights_url(arch, True), keras_weights_url(arch, False))
                             for arch in KERAS_RESNETS)
