"""Running a classifier: the device and precision to use, which checkpoint a name means, batched predictions.

Shared by `finetune` (validation), `evaluate` and `predict` so all three see a model the same way.
"""
import contextlib
import os
from pathlib import Path
from typing import ContextManager, List, Optional, Tuple, Union

import timm
import torch
from timm.data import ImageNetInfo

from ..errors import ResNetV2ZooError
from ..weights.checkpoint import CONFIG_NAME, load_model

__all__ = ['BEST_DIR', 'pick_device', 'autocast', 'load_classifier', 'label_names_of', 'predict_loader']

PathLike = Union[str, os.PathLike]
# A fine-tuning run directory keeps its best model here (timm's save_for_hf layout).
BEST_DIR = 'best'


def pick_device(name: Optional[str] = None) -> torch.device:
    return torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 on CUDA where supported (no loss scaling needed), else fp16; full precision on the CPU."""
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> ContextManager:
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def prepare_for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to `device`; channels_last on CUDA, where the convolutions run faster in it."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == 'cuda' else model


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == 'cuda' else images


def load_classifier(spec: PathLike) -> torch.nn.Module:
    """A fine-tuning run directory, a model directory, a `.safetensors` file, or a timm model name (pretrained)."""
    path = Path(spec)
    if (path / BEST_DIR / CONFIG_NAME).is_file():
        path = path / BEST_DIR
    if path.exists():
        return load_model(path)
    if timm.is_model(str(spec)):
        return timm.create_model(str(spec), pretrained=True)
    raise ResNetV2ZooError(f'{spec} is neither a checkpoint (run directory, model directory, .safetensors file) '
                           f'nor a timm model name')


def label_names_of(model: torch.nn.Module) -> List[str]:
    """Class names the checkpoint carries; for ImageNet (synset ids or no names) the readable descriptions."""
    names = list(model.pretrained_cfg.get('label_names') or [])
    if model.num_classes == 1000:
        imagenet = ImageNetInfo()
        if not names or names == list(imagenet.label_names()):
            return list(imagenet.label_descriptions())
    if len(names) == model.num_classes:
        return names
    return [f'class {i}' for i in range(model.num_classes)]


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) over the whole loader, in loader order, as float32 on the CPU."""
    model.eval()
    logits, targets = [], []
    for images, target in loader:
        with autocast(device):
            logits.append(model(to_device(images, device)).float().cpu())
        targets.append(torch.as_tensor(target))
    if not logits:
        return torch.empty(0, model.num_classes), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)
