"""Model directories in timm's `save_for_hf` layout (`config.json` + `model.safetensors`), and loading them.

One writer serves the converter, the pretrained cache and fine-tuning, so every checkpoint this
package makes loads the same three ways: `timm.create_model('local-dir:DIR')`, timm's
`pretrained_cfg_overlay=dict(file=DIR/model.safetensors)`, and `load_model(DIR)`. The weights file
also carries architecture, class count and label names in its safetensors metadata, so it can be
loaded on its own. Nothing here unpickles.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import safetensors
import safetensors.torch
import timm
import torch
from timm.models._hub import save_config_for_hf

from ..errors import ResNetV2ZooError
from .atomic import atomic_dir, atomic_file

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
PathLike = Union[str, os.PathLike]


def check_writable_parent(out: Path) -> None:
    """Fail before any work when `out` cannot be created: its parent is missing or is not a directory."""
    if not out.parent.exists():
        raise ResNetV2ZooError(f'cannot write {out}: directory {out.parent} does not exist')
    if not out.parent.is_dir():
        raise ResNetV2ZooError(f'cannot write {out}: {out.parent} is not a directory')


def weights_metadata(model: torch.nn.Module, label_names: Optional[Sequence[str]] = None,
                     extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """safetensors metadata (string to string) that makes the file self-describing."""
    metadata = {
        'format': 'pt',
        'architecture': model.pretrained_cfg['architecture'],
        'num_classes': str(model.num_classes),
    }
    if label_names:
        metadata['label_names'] = json.dumps(list(label_names))
    metadata.update(extra or {})
    return metadata


def save_weights_file(model: torch.nn.Module, path: PathLike, label_names: Optional[Sequence[str]] = None,
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the model's state dict to one self-describing `.safetensors` file, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=weights_metadata(model, label_names, metadata))
        except safetensors.SafetensorError as e:  # how it reports a failed write (disk full): not an OSError
            raise OSError(str(e)) from e
    return path


def save_model_dir(model: torch.nn.Module, out_dir: PathLike, label_names: Optional[Sequence[str]] = None,
                   metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `out_dir` in timm's `save_for_hf` layout, replacing any previous one whole."""
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    model_config: Dict[str, Any] = {}
    if label_names:
        if len(label_names) != model.num_classes:
            raise ResNetV2ZooError(
                f'{len(label_names)} label names given for a model with {model.num_classes} classes')
        model_config['label_names'] = list(label_names)
    with atomic_dir(out_dir) as tmp:
        save_weights_file(model, tmp / WEIGHTS_NAME, label_names, metadata)
        save_config_for_hf(model, tmp / CONFIG_NAME, model_config=model_config)
    return out_dir


def read_weights_metadata(path: PathLike) -> Dict[str, str]:
    with safetensors.safe_open(str(path), framework='pt') as f:
        return f.metadata() or {}


def load_model(path: PathLike, **kwargs: Any) -> torch.nn.Module:
    """Build the model a checkpoint directory or a self-describing `.safetensors` file describes.

    `kwargs` go to `timm.create_model` (for example `num_classes` to re-head, `features_only`).
    Only safetensors is read, so a checkpoint cannot run code; a pickle under any name is refused.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ResNetV2ZooError(f'{path} is not a model directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}')
        _safetensors_metadata(path / WEIGHTS_NAME)
        return _create(path, f'local-dir:{path}', kwargs)
    if not path.is_file():
        raise ResNetV2ZooError(f'no checkpoint at {path}')
    metadata = _safetensors_metadata(path)
    if 'architecture' not in metadata:
        raise ResNetV2ZooError(f'{path} has no architecture in its metadata; load it with timm.create_model(arch, '
                               f'pretrained=True, pretrained_cfg_overlay=dict(file=...))')
    overlay: Dict[str, Any] = dict(file=str(path), num_classes=int(metadata['num_classes']))
    if 'label_names' in metadata:
        overlay['label_names'] = tuple(json.loads(metadata['label_names']))
    kwargs.setdefault('num_classes', overlay['num_classes'])
    return _create(path, metadata['architecture'], dict(kwargs, pretrained_cfg_overlay=overlay))


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    """The header of a safetensors file: parsed as JSON, never unpickled, so a pickle fails here."""
    try:
        return read_weights_metadata(path)
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ResNetV2ZooError(f'{path} is not a safetensors file ({type(e).__name__}: {e})') from e


def _create(path: Path, name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    """timm.create_model, with a damaged checkpoint (truncated data, tensors of another model) named as such."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (safetensors.SafetensorError, RuntimeError, KeyError, ValueError) as e:
        raise ResNetV2ZooError(f'{path} does not load as a {name} checkpoint ({type(e).__name__}: {e})') from e
