"""`pretrained=True` for the `*_keras` models: the official Keras ImageNet weights, converted once and cached.

timm has no hub copy of these weights, so on first use they are found or fetched as Keras files,
converted, and kept in the package cache; timm then loads the cached `model.safetensors` through its
own `pretrained_cfg` `file` path, so its usual adaptations (a new head for `num_classes != 1000`,
`adapt_input_conv` for `in_chans != 3`, `features_only`) apply unchanged. Sources, in order:

1. weights the resolved `pretrained_cfg` already names (`pretrained_cfg_overlay=dict(file=...)`,
   a state dict, a local dir or hub id): left to timm;
2. converted weights in the package cache (`$RESNETV2_ZOO_CACHE`, else `$XDG_CACHE_HOME/resnetv2_zoo`);
3. the official `.h5` already in the Keras cache (`$KERAS_HOME/models`, else `~/.keras/models`);
4. a download from the Keras URL (`$RESNETV2_ZOO_KERAS_URL` or `KERAS_WEIGHTS_URL`), unless
   `HF_HUB_OFFLINE` or `RESNETV2_ZOO_OFFLINE` is set;
5. else `WeightsUnavailableError`, saying how to convert a file by hand.

Keras files are checked against the MD5s Keras publishes before conversion. Processes that fill the
cache at the same time serialise on a file lock and the converted directory appears by atomic rename,
so there is exactly one conversion and readers never see a partial file. Nothing here imports
TensorFlow or Keras.
"""
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from filelock import FileLock
from timm.data import ImageNetInfo
from timm.models import resolve_pretrained_cfg

from ..errors import WeightsUnavailableError
from ..keras.files import file_hexdigest
from ..keras.spec import KERAS_RESNETS, KERAS_WEIGHTS_URL
from .checkpoint import WEIGHTS_NAME, read_weights_metadata

__all__ = [
    'PRETRAINED_TAG', 'cache_dir', 'keras_cache_dir', 'downloads_disabled',
    'keras_weights_file_name', 'cached_keras_weights', 'pretrained_kwargs', 'decode_predictions',
]

_logger = logging.getLogger(__name__)

PRETRAINED_TAG = 'tf_in1k'  # the pretrained tag that stands for the official Keras ImageNet weights
_TRUE_VALUES = ('1', 'ON', 'YES', 'TRUE')  # as huggingface_hub parses HF_HUB_OFFLINE


def cache_dir() -> Path:
    """Where converted weights live: `$RESNETV2_ZOO_CACHE`, else `$XDG_CACHE_HOME/resnetv2_zoo`."""
    if os.environ.get('RESNETV2_ZOO_CACHE'):
        return Path(os.environ['RESNETV2_ZOO_CACHE']).expanduser()
    xdg_cache = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(xdg_cache).expanduser() / 'resnetv2_zoo'


def keras_cache_dir() -> Path:
    """Where `keras.utils.get_file` keeps downloaded application weights."""
    return Path(os.environ.get('KERAS_HOME') or Path.home() / '.keras').expanduser() / 'models'


def downloads_disabled() -> bool:
    return any(os.environ.get(name, '').strip().upper() in _TRUE_VALUES
               for name in ('HF_HUB_OFFLINE', 'RESNETV2_ZOO_OFFLINE'))


def keras_weights_file_name(arch: str, include_top: bool = True) -> str:
    """File name Keras gives the official weights of `arch`, e.g. `resnet50v2_weights_tf_dim_ordering_tf_kernels.h5`."""
    return KERAS_RESNETS[arch].weights_file_name(include_top)


def _keras_weights_url(arch: str, include_top: bool) -> str:
    base_url = os.environ.get('RESNETV2_ZOO_KERAS_URL') or KERAS_WEIGHTS_URL
    return base_url.rstrip('/') + '/' + keras_weights_file_name(arch, include_top)


def _expected_md5(arch: str, include_top: bool) -> str:
    return KERAS_RESNETS[arch].expected_md5(include_top)


def _converted_dir(arch: str, include_top: bool) -> Path:
    return cache_dir() / f'{arch}.{PRETRAINED_TAG}{"" if include_top else "-notop"}'


def _find_converted(arch: str, variants: Sequence[bool]) -> Optional[Path]:
    for include_top in variants:
        weights = _converted_dir(arch, include_top) / WEIGHTS_NAME
        if weights.is_file():  # written by atomic rename, so present means complete
            return weights
    return None


def _convert_into_cache(h5: Path, arch: str, include_top: bool) -> Path:
    from .convert import convert_to_dir  # the converter imports the model module, which imports this lazily

    label_names = ImageNetInfo().label_names() if include_top else None
    out_dir = _converted_dir(arch, include_top)
    _logger.info(f'Converting {h5} into {out_dir}')
    convert_to_dir(h5, out_dir, arch=arch, label_names=label_names)
    return out_dir / WEIGHTS_NAME


def _download_and_convert(arch: str, include_top: bool) -> Path:
    """Download the official file into a private temp dir, check its MD5, convert it; the download is not kept."""
    url = _keras_weights_url(arch, include_top)
    expected = _expected_md5(arch, include_top)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix='.download-') as tmp:
        h5 = Path(tmp) / keras_weights_file_name(arch, include_top)
        _logger.info(f'Downloading {url}')
        torch.hub.download_url_to_file(url, str(h5), progress=True)
        found = file_hexdigest(h5, 'md5')
        if found != expected:
            raise WeightsUnavailableError(
                f'{url} downloaded with MD5 {found}, expected {expected}; the file was discarded and nothing '
                f'was cached. {_hand_conversion_hint(arch, include_top)}')
        return _convert_into_cache(h5, arch, include_top)


def _hand_conversion_hint(arch: str, include_top: bool) -> str:
    file_name = keras_weights_file_name(arch, include_top)
    return (
        f'To convert the Keras weights by hand, get {file_name} (from {_keras_weights_url(arch, include_top)}, '
        f'or keras.applications with weights="imagenet"), then either copy it into {keras_cache_dir()} and retry, '
        f'or run `resnetv2-zoo convert {file_name} -o {_converted_dir(arch, include_top)}`.')


def cached_keras_weights(arch: str, include_top: bool = True) -> Path:
    """Path of the converted official Keras weights of `arch` in the package cache, made on first use.

    With `include_top=False` a converted file with the top serves too (timm drops the head), and the
    smaller `_notop` Keras file is accepted, as a `include_top=False` Keras user has only that one.
    """
    if arch not in KERAS_RESNETS:
        raise WeightsUnavailableError(f'no official Keras weights for {arch!r}; known: {sorted(KERAS_RESNETS)}')
    variants = (True,) if include_top else (True, False)
    weights = _find_converted(arch, variants)
    if weights is not None:
        return weights

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f'{arch}.{PRETRAINED_TAG}.lock'):
        weights = _find_converted(arch, variants)  # another process may have made it while we waited
        if weights is not None:
            return weights

        reasons: List[str] = [f'nothing converted in {root}']
        for top in variants:
            h5 = keras_cache_dir() / keras_weights_file_name(arch, top)
            if not h5.is_file():
                reasons.append(f'no {h5}')
                continue
            found, expected = file_hexdigest(h5, 'md5'), _expected_md5(arch, top)
            if found == expected:
                return _convert_into_cache(h5, arch, top)
            reasons.append(f'{h5} has MD5 {found}, expected {expected} (ignored)')

        download_top = variants[-1]  # the smallest file that serves the request
        if downloads_disabled():
            reasons.append('downloads are off (HF_HUB_OFFLINE or RESNETV2_ZOO_OFFLINE is set)')
        else:
            try:
                return _download_and_convert(arch, download_top)
            except OSError as e:  # urllib's URLError and HTTPError are OSErrors
                reasons.append(f'download of {_keras_weights_url(arch, download_top)} failed: {e}')
    raise WeightsUnavailableError(
        f'no pretrained weights for {arch}: {"; ".join(reasons)}. {_hand_conversion_hint(arch, download_top)}')


def pretrained_kwargs(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`build_model_with_cfg` kwargs whose pretrained cfg points timm at the cached converted Keras weights.

    Returned unchanged when the resolved cfg already names weights (the user's `file`, a state dict,
    a local dir or hub id) or is not the Keras ImageNet tag; timm then loads or refuses as usual.
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.source or cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id or cfg.tag != PRETRAINED_TAG:
        return kwargs
    wants_head = kwargs.get('num_classes', cfg.num_classes) == cfg.num_classes
    include_top = wants_head and not kwargs.get('features_only', False)
    weights = cached_keras_weights(variant, include_top=include_top)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=str(weights))
    weights_classes = int(read_weights_metadata(weights)['num_classes'])
    if weights_classes != cfg.num_classes:
        if include_top:  # e.g. a `_notop` file converted by hand into the directory meant for the full one
            raise WeightsUnavailableError(
                f'{weights} holds a model with {weights_classes} classes, expected {cfg.num_classes}; delete '
                f'{weights.parent} and retry')
        overlay.update(num_classes=weights_classes, label_names=None, label_descriptions=None)  # headless: no labels
    return {**kwargs, 'pretrained_cfg_overlay': overlay}


def decode_predictions(logits: torch.Tensor, top: int = 5) -> List[List[Tuple[str, str, float]]]:
    """Keras's `decode_predictions` for ImageNet logits: per image, (WordNet id, description, probability), best first.

    The WordNet ids are the class names Keras returns; the descriptions are timm's WordNet lemmas
    (e.g. 'tench, Tinca tinca' where Keras says 'tench'). Probabilities are the softmax of the logits,
    which is what a Keras model with its softmax top outputs.
    """
    info = ImageNetInfo()
    if logits.ndim != 2 or logits.shape[1] != info.num_classes():
        raise ValueError(f'decode_predictions expects ImageNet logits of shape (batch, {info.num_classes()}), '
                         f'got {tuple(logits.shape)}')
    probs, indices = logits.detach().float().softmax(dim=1).topk(min(top, logits.shape[1]), dim=1)
    return [
        [(info.index_to_label_name(i), info.index_to_description(i), p) for p, i in zip(row_p.tolist(), row_i.tolist())]
        for row_p, row_i in zip(probs, indices)
    ]
