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

Every wait is bounded and says what it waits for: a download that receives no bytes for
`$RESNETV2_ZOO_DOWNLOAD_TIMEOUT` seconds (default 60) fails, and a process that finds another one
filling the cache logs one warning naming the lock and gives up after `$RESNETV2_ZOO_LOCK_TIMEOUT`
seconds (default 600). The lock is an `flock`, which the kernel drops when its holder dies, so a
killed process never blocks the next one. A cache that cannot be written (read-only, not a folder,
another account's) is not an error in itself: a valid Keras file is then converted into a private
temporary folder that lives as long as the process.
"""
import http.client
import logging
import math
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from filelock import FileLock, Timeout
from timm.data import ImageNetInfo
from timm.models import resolve_pretrained_cfg
from tqdm import tqdm

from ..errors import ResNetV2ZooError, WeightsUnavailableError
from ..keras.files import file_hexdigest
from ..keras.spec import KERAS_RESNETS, KERAS_WEIGHTS_URL
from ..models.keras_weights import is_keras_weights_url
from .checkpoint import WEIGHTS_NAME, inspect_checkpoint, read_weights_metadata
from .decode import top_k_labels

__all__ = [
    'PRETRAINED_TAG', 'cache_dir', 'keras_cache_dir', 'downloads_disabled',
    'keras_weights_file_name', 'cached_keras_weights', 'pretrained_kwargs', 'decode_predictions',
]

_logger = logging.getLogger(__name__)

PRETRAINED_TAG = 'tf_in1k'  # the pretrained tag that stands for the official Keras ImageNet weights
_TRUE_VALUES = ('1', 'ON', 'YES', 'TRUE')  # as huggingface_hub parses HF_HUB_OFFLINE
DOWNLOAD_TIMEOUT_S = 60.  # default of $RESNETV2_ZOO_DOWNLOAD_TIMEOUT: longest time without a byte
LOCK_TIMEOUT_S = 600.  # default of $RESNETV2_ZOO_LOCK_TIMEOUT: longest wait for another process's conversion
MAX_DOWNLOAD_BYTES = 1 << 30  # the largest official file, ResNet152V2 with its top, is 235 MiB


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
        try:
            if weights.is_file():  # written by atomic rename, so present means complete
                return weights
        except OSError:  # e.g. a cache folder we may not search: as good as empty
            pass
    return None


def _env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """A finite number of seconds from the environment; a bad value is refused, never read as 'forever'."""
    raw = os.environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = '>= 0' if allow_zero else '> 0'
        raise ResNetV2ZooError(f'{name} must be a finite number of seconds {bound}, got {raw!r}')
    return value


def _lock_path(arch: str) -> Path:
    return cache_dir() / f'{arch}.{PRETRAINED_TAG}.lock'


def _acquire_cache_lock(lock: FileLock, arch: str) -> None:
    """Take the cache lock of `arch`; if another process holds it, say so once and wait a bounded time.

    The message is a logging warning, so it reaches stderr everywhere: through the package handler that
    the CLI installs, through Python's last-resort handler in a program that configures no logging, and
    through its own handlers in one that does.
    """
    try:
        lock.acquire(blocking=False)
        return
    except Timeout:
        pass
    timeout = _env_seconds('RESNETV2_ZOO_LOCK_TIMEOUT', LOCK_TIMEOUT_S, allow_zero=True)
    _logger.warning(f'waiting for {lock.lock_file}: another process is fetching or converting the Keras weights of '
                    f'{arch}; giving up after {timeout:g} s (RESNETV2_ZOO_LOCK_TIMEOUT)')
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise WeightsUnavailableError(
            f'gave up after {timeout:g} s waiting for {lock.lock_file}, held by another process that is fetching or '
            f'converting the Keras weights of {arch}; retry when it is done, or set RESNETV2_ZOO_LOCK_TIMEOUT to wait '
            'longer') from None


class _DownloadFailed(Exception):
    """Why a download gave no usable file; the caller adds it, with the URL, to its list of reasons."""


def _download(url: str, dst: Path) -> None:
    """Stream `url` into `dst` with a progress bar, bounded in time (no bytes for the timeout) and in size.

    `urlopen`'s timeout applies to the connect and to every read of the socket, so a server that sends
    headers and then nothing, or accepts and never answers, ends after that many seconds.
    """
    timeout = _env_seconds('RESNETV2_ZOO_DOWNLOAD_TIMEOUT', DOWNLOAD_TIMEOUT_S)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dst, 'xb') as f:
            total = response.length  # None without a Content-Length
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=dst.name) as bar:
                while chunk := response.read1(1 << 16):  # what has arrived: read() would wait for 64 KiB
                    received += len(chunk)
                    if received > MAX_DOWNLOAD_BYTES:
                        raise _DownloadFailed(f'it sends more than {MAX_DOWNLOAD_BYTES} bytes, more than any '
                                              'official file has; stopped')
                    f.write(chunk)
                    bar.update(len(chunk))
    except _DownloadFailed:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and HTTPError are OSErrors
        if isinstance(e, TimeoutError) or isinstance(getattr(e, 'reason', None), TimeoutError):
            raise _DownloadFailed(f'no bytes for {timeout:g} s (RESNETV2_ZOO_DOWNLOAD_TIMEOUT) after {received} '
                                  'bytes') from e
        raise _DownloadFailed(f'{type(e).__name__}: {e}') from e
    if total is not None and received != total:
        raise _DownloadFailed(f'the connection closed after {received} of {total} bytes')


def _convert_into(h5: Path, arch: str, include_top: bool, out_dir: Path) -> Path:
    from .convert import convert_to_dir  # the converter imports the model module, which imports this lazily

    label_names = ImageNetInfo().label_names() if include_top else None
    _logger.info(f'Converting {h5} into {out_dir}')
    try:
        convert_to_dir(h5, out_dir, arch=arch, label_names=label_names)
    except (ResNetV2ZooError, OSError) as e:  # e.g. a full disk; the converter leaves nothing half-written
        if isinstance(e, WeightsUnavailableError):
            raise
        raise WeightsUnavailableError(f'converting {h5} into {out_dir} failed: {e}') from e
    return out_dir / WEIGHTS_NAME


def _download_and_convert(arch: str, include_top: bool) -> Path:
    """Download the official file into a private temp dir, check its MD5, convert it; the download is not kept.

    The temp dir is named after `arch`, so one that a killed process left is removed by the next lock holder.
    """
    url = _keras_weights_url(arch, include_top)
    expected = _expected_md5(arch, include_top)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=_download_prefix(arch)) as tmp:
        h5 = Path(tmp) / keras_weights_file_name(arch, include_top)
        _logger.info(f'Downloading {url}')
        _download(url, h5)
        found = file_hexdigest(h5, 'md5')
        if found != expected:
            raise WeightsUnavailableError(
                f'{url} downloaded with MD5 {found}, expected {expected}; the file was discarded and nothing '
                f'was cached. {_hand_conversion_hint(arch, include_top)}')
        return _convert_into(h5, arch, include_top, _converted_dir(arch, include_top))


def _download_prefix(arch: str) -> str:
    return f'.download-{arch}.'


def _remove_stale_downloads(root: Path, arch: str) -> None:
    """Partial downloads of `arch` left by a killed process: only the holder of `arch`'s lock downloads it."""
    for stale in root.glob(_download_prefix(arch) + '*'):
        shutil.rmtree(stale, ignore_errors=True)


def _hand_conversion_hint(arch: str, include_top: bool) -> str:
    file_name = keras_weights_file_name(arch, include_top)
    return (
        f'To convert the Keras weights by hand, get {file_name} (from {_keras_weights_url(arch, include_top)}, '
        f'or keras.applications with weights="imagenet"), then either copy it into {keras_cache_dir()} and retry, '
        f'or run `resnetv2-zoo convert {file_name} -o {_converted_dir(arch, include_top)}`.')


def _keras_cache_file(arch: str, variants: Sequence[bool], reasons: List[str]) -> Optional[Tuple[Path, bool, str]]:
    """(path, include_top, MD5) of the first official file in the Keras cache with the published MD5."""
    for top in variants:
        h5 = keras_cache_dir() / keras_weights_file_name(arch, top)
        try:
            if not h5.is_file():
                reasons.append(f'no {h5}')
                continue
            found = file_hexdigest(h5, 'md5')
        except OSError as e:
            reasons.append(f'cannot read {h5}: {e.strerror or e}')
            continue
        expected = _expected_md5(arch, top)
        if found == expected:
            return h5, top, found
        reasons.append(f'{h5} has MD5 {found}, expected {expected} (ignored)')
    return None


# Conversions made outside an unwritable cache, by (arch, include_top, MD5): one per process, whose folders
# `TemporaryDirectory` removes when the process exits (timm reads the weights after our hook returns).
_TEMP_CONVERSIONS: Dict[Tuple[str, bool, str], tempfile.TemporaryDirectory] = {}


def _convert_outside_cache(arch: str, variants: Sequence[bool], why: str) -> Path:
    """The cache cannot be written: convert a valid Keras-cache file into a private temporary folder, or refuse.

    Nothing is downloaded, as a download that cannot be kept would be repeated by every process.
    """
    reasons = [why]
    found = _keras_cache_file(arch, variants, reasons)
    if found is None:
        raise WeightsUnavailableError(
            f'no pretrained weights for {arch}: {"; ".join(reasons)}; nothing is downloaded into an unwritable cache. '
            f'Set RESNETV2_ZOO_CACHE to a writable folder, or put {keras_weights_file_name(arch, variants[-1])} into '
            f'{keras_cache_dir()}.')
    h5, top, md5 = found
    key = (arch, top, md5)
    if key not in _TEMP_CONVERSIONS:
        try:
            tmp = tempfile.TemporaryDirectory(prefix=f'resnetv2_zoo-{arch}.{PRETRAINED_TAG}-')
        except OSError as e:
            raise WeightsUnavailableError(
                f'no pretrained weights for {arch}: {why}, and no temporary folder to convert {h5} into: '
                f'{e.strerror or e}') from e
        _logger.warning(f'{why}; converting {h5} into {tmp.name}, which is deleted when this process exits (set '
                        'RESNETV2_ZOO_CACHE to a writable folder to convert only once)')
        try:
            _convert_into(h5, arch, top, Path(tmp.name) / 'weights')
        except BaseException:
            tmp.cleanup()
            raise
        _TEMP_CONVERSIONS[key] = tmp
    return Path(_TEMP_CONVERSIONS[key].name) / 'weights' / WEIGHTS_NAME


def _fill_cache(arch: str, variants: Sequence[bool]) -> Path:
    """With the lock held and the cache writable: convert the Keras-cache file, else download and convert."""
    reasons: List[str] = [f'nothing converted in {cache_dir()}']
    found = _keras_cache_file(arch, variants, reasons)
    if found is not None:
        h5, top, _ = found
        return _convert_into(h5, arch, top, _converted_dir(arch, top))
    download_top = variants[-1]  # the smallest file that serves the request
    if downloads_disabled():
        reasons.append('downloads are off (HF_HUB_OFFLINE or RESNETV2_ZOO_OFFLINE is set)')
    else:
        try:
            return _download_and_convert(arch, download_top)
        except _DownloadFailed as e:
            reasons.append(f'download of {_keras_weights_url(arch, download_top)} failed: {e}')
    raise WeightsUnavailableError(
        f'no pretrained weights for {arch}: {"; ".join(reasons)}. {_hand_conversion_hint(arch, download_top)}')


def cached_keras_weights(arch: str, include_top: bool = True) -> Path:
    """Path of the converted official Keras weights of `arch` in the package cache, made on first use.

    With `include_top=False` a converted file with the top serves too (timm drops the head), and the
    smaller `_notop` Keras file is accepted, as a `include_top=False` Keras user has only that one.
    When the cache cannot be written, the path is in a temporary folder that lives as long as the process.
    """
    if arch not in KERAS_RESNETS:
        raise WeightsUnavailableError(f'no official Keras weights for {arch!r}; known: {sorted(KERAS_RESNETS)}')
    variants = (True,) if include_top else (True, False)
    weights = _find_converted(arch, variants)
    if weights is not None:
        return weights

    root = cache_dir()
    try:  # a folder we may not write to, or a path through a file: the lock file cannot be made
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(_lock_path(arch))
        _acquire_cache_lock(lock, arch)
    except OSError as e:
        return _convert_outside_cache(arch, variants, f'the cache {root} is not writable ({_os_error_text(e)})')
    try:
        weights = _find_converted(arch, variants)  # another process may have made it while we waited
        if weights is not None:
            return weights
        try:  # the lock file may predate a loss of write access: try what the conversion will do
            _remove_stale_downloads(root, arch)
            os.rmdir(tempfile.mkdtemp(dir=root, prefix='.probe-'))
        except OSError as e:
            return _convert_outside_cache(arch, variants, f'the cache {root} is not writable ({_os_error_text(e)})')
        return _fill_cache(arch, variants)
    finally:
        lock.release()


def _os_error_text(e: OSError) -> str:
    return f'{type(e).__name__}: {e.strerror}' if e.strerror else f'{type(e).__name__}: {e}'


def pretrained_kwargs(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`build_model_with_cfg` kwargs whose pretrained cfg points timm at the cached converted Keras weights.

    Returned unchanged when the resolved cfg already names weights (the user's `file`, a state dict,
    a local dir or hub id) or is not the Keras ImageNet tag; timm then loads or refuses as usual.
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.source == 'local-dir' and cfg.file:  # `local-dir:DIR`: a config.json that contradicts its weights would
        inspect_checkpoint(cfg.file)  # otherwise load with a random head (timm re-heads on model_args.num_classes)
    # the cfgs name the official Keras URL (so that timm lists the weights): that one is ours to resolve
    url = cfg.url if not is_keras_weights_url(cfg.url) else None
    if cfg.source or cfg.file or cfg.state_dict or url or cfg.hf_hub_id or cfg.tag != PRETRAINED_TAG:
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
    labels = list(zip(info.label_names(), info.label_descriptions()))
    return [[(wnid, description, p) for (wnid, description), p in row] for row in top_k_labels(logits, labels, top)]
