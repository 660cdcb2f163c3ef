"""Running a classifier: the device and precision to use, which checkpoint a name means, batched predictions.

Shared by `finetune` (validation), `evaluate`, `predict` and `export` so all of them see a model the same way.
"""
import argparse
import contextlib
import difflib
import os
from pathlib import Path
from typing import Any, ContextManager, List, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.data import ImageNetInfo
from tqdm import tqdm

from ..errors import ResNetV2ZooError
from ..weights.checkpoint import CONFIG_NAME, load_model
from .data import ImageSamples, Sample

__all__ = [
    'BEST_DIR', 'AMP_CHOICES', 'pick_device', 'autocast', 'resolve_amp', 'load_classifier', 'check_model_name',
    'check_checkpoint',
    'prepare_for_inference', 'label_names_of', 'predict_loader', 'predict_samples',
]

PathLike = Union[str, os.PathLike]
# A fine-tuning run directory keeps its best model here (timm's save_for_hf layout).
BEST_DIR = 'best'
# --amp: 'auto' is bf16 (fp16 where bf16 is unsupported) on CUDA and float32 on the CPU; 'bf16' also runs on the
# CPU (oneDNN has bf16 kernels); 'fp16' is CUDA only, as CPU autocast in fp16 is slower than float32 there.
AMP_CHOICES = ('auto', 'none', 'bf16', 'fp16')
# timm train.py checkpoints: a pickle of {'state_dict', 'arch', 'args' (an argparse.Namespace), ...}
TIMM_CHECKPOINT_SUFFIXES = ('.pth.tar', '.pth', '.pt', '.tar')


def pick_device(name: Optional[str] = None) -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1', ...), else CUDA when available; an unusable device is one clear error."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ResNetV2ZooError(f'--device {name}: not a device name (e.g. cpu, cuda, cuda:0)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ResNetV2ZooError(f'--device {name}: CUDA is not available here; use --device cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ResNetV2ZooError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    return device


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 on CUDA where supported (no loss scaling needed), else fp16; full precision on the CPU."""
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_amp(device: torch.device, amp: str = 'auto') -> Optional[torch.dtype]:
    """The autocast dtype `--amp` means on `device` (None: float32); fp16 on the CPU is refused."""
    if amp == 'auto':
        return amp_dtype(device)
    if amp == 'none':
        return None
    if amp == 'fp16' and device.type != 'cuda':
        raise ResNetV2ZooError(f'--amp fp16 needs a CUDA device (here: {device}); on the CPU use --amp bf16 or none')
    if amp not in ('bf16', 'fp16'):
        raise ResNetV2ZooError(f'--amp {amp}: expected one of {", ".join(AMP_CHOICES)}')
    return torch.bfloat16 if amp == 'bf16' else torch.float16


def autocast(device: torch.device, dtype: Union[torch.dtype, None, str] = 'auto') -> ContextManager:
    """Autocast to `dtype` on `device`; 'auto' is `amp_dtype(device)`, None runs in float32."""
    dtype = amp_dtype(device) if dtype == 'auto' else dtype
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def prepare_for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to `device`; channels_last on CUDA, where the convolutions run faster in it."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == 'cuda' else model


def prepare_for_inference(model: torch.nn.Module, device: torch.device, optimize: bool = True) -> torch.nn.Module:
    """An eval-mode model on `device` for prediction only.

    With `optimize` (the default of `evaluate` and `predict`), channels_last on every device, and for the
    ResNetV2 models the BatchNorms that follow a conv folded into it (`models.optimize`): the same function
    up to float32 round-off, about a third faster on the CPU. Without it, the model as `prepare_for_device`
    sets it up for training-time validation.
    """
    model = model.eval()
    if not optimize:
        return prepare_for_device(model, device)
    from ..models.optimize import optimize_for_inference
    from ..models.resnetv2_keras import ResNetV2Keras

    if isinstance(model, ResNetV2Keras):
        model = optimize_for_inference(model, channels_last=True)
    else:
        model = model.requires_grad_(False).to(memory_format=torch.channels_last)
    return model.to(device)


def to_device(images: torch.Tensor, device: torch.device, channels_last: Optional[bool] = None) -> torch.Tensor:
    """`images` on `device`; channels_last by default on CUDA (or as `channels_last` says)."""
    images = images.to(device, non_blocking=True)
    if channels_last is None:
        channels_last = device.type == 'cuda'
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.ndim == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def check_model_name(name: str) -> None:
    """Refuse a name that is neither a path nor a timm model, with the closest model names: one line, nothing made."""
    if name.startswith(('hf-hub:', 'local-dir:', 'hf_hub:')) or timm.is_model(name):
        return
    if os.sep in name or '/' in name or name.endswith(('.safetensors', *TIMM_CHECKPOINT_SUFFIXES)):
        raise ResNetV2ZooError(f'{name}: no such file or directory')
    close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
    hint = f'; did you mean {close[0]}?' if close else ' (timm.list_models() lists the known models)'
    raise ResNetV2ZooError(f'unknown model {name}{hint}')


def check_checkpoint(spec: PathLike) -> None:
    """Fail fast, before any other work, on a checkpoint that is neither an existing path nor a model name."""
    if not os.path.lexists(spec):
        check_model_name(str(spec))


def load_classifier(spec: PathLike) -> torch.nn.Module:
    """A fine-tuning run directory, a model directory, a `.safetensors` file, a timm `train.py` checkpoint
    (`.pth.tar`), or a timm model name (pretrained; also `hf-hub:` and `local-dir:` names)."""
    path = Path(spec)
    if (path / BEST_DIR / CONFIG_NAME).is_file():
        path = path / BEST_DIR
    if path.is_file() and path.name.endswith(TIMM_CHECKPOINT_SUFFIXES):
        return load_timm_checkpoint(path)
    if path.exists():
        return load_model(path)
    name = str(spec)
    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=True)
    except ResNetV2ZooError:
        raise
    except Exception as e:  # e.g. huggingface_hub's LocalEntryNotFoundError offline: no traceback, one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ResNetV2ZooError(f'{name}: no pretrained weights could be loaded ({type(e).__name__}: {reason}); '
                               'evaluating or predicting with random weights is meaningless') from e


def load_timm_checkpoint(path: PathLike) -> torch.nn.Module:
    """A checkpoint of timm's `train.py` (`.pth.tar`): {'arch', 'state_dict', 'args', ...}.

    Read with `torch.load(weights_only=True)`, which refuses to run code; the `args` namespace train.py
    stores is the one class allowed beyond tensors and containers. The class count comes from the
    classifier weights; the class names are not in the file (see `label_names_of`).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResNetV2ZooError(
            f'{path}: not a checkpoint that loads safely with torch.load(weights_only=True) ({reason}); nothing from '
            f'it is run. If you trust the file, rewrite it weights-only with: python -c "import torch; '
            f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'arch': c['arch'], 'state_dict': c['state_dict']}}, '{path}.clean.pth.tar')\"") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise ResNetV2ZooError(f"{path}: expected a timm train.py checkpoint, a dict with 'state_dict' and 'arch'")
    arch = checkpoint.get('arch')
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ResNetV2ZooError(f"{path}: its 'arch' {arch!r} is not a timm model (import the package that "
                               'registers it first)')
    state_dict = {k.removeprefix('module.'): v for k, v in checkpoint['state_dict'].items()}
    classifier = timm.models.get_pretrained_cfg_value(arch, 'classifier') or 'head.fc'
    head = state_dict.get(f'{classifier}.weight')
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) else 0
    model = timm.create_model(arch, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ResNetV2ZooError(f'{path}: its weights do not fit {arch} with {num_classes} classes: '
                               f'{str(e).splitlines()[0]}') from None
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=None, label_descriptions=None)
    return model


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
def predict_loader(model: torch.nn.Module, loader: Any, device: torch.device, progress: bool = False,
                   amp: Union[torch.dtype, None, str] = 'auto') -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) over the whole loader, in loader order, as float32 on the CPU (the model is set to eval).

    `progress` shows a bar (on stderr) when there is more than one batch; `amp` is the autocast dtype
    ('auto': `amp_dtype(device)`, None: float32). Inputs follow the model's memory format.
    """
    model.eval()
    channels_last = _is_channels_last(model)
    logits, targets = [], []
    show = progress and _length(loader) != 1 and _length(loader) != 0
    batches = tqdm(loader, desc='predict', unit='batch', leave=False, dynamic_ncols=True) if show else loader
    for images, target in batches:
        with autocast(device, amp):
            logits.append(model(to_device(images, device, channels_last)).float().cpu())
        targets.append(torch.as_tensor(target))
    if not logits:
        return torch.empty(0, model.num_classes), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def predict_samples(model: torch.nn.Module, samples: Sequence[Sample], transform: Any, device: torch.device,
                    batch_size: int = 32, workers: int = 0, sampler: Optional[torch.utils.data.Sampler] = None,
                    progress: bool = False, amp: Union[torch.dtype, None, str] = 'auto',
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one image-to-logits path: (float32 logits on the CPU, int64 targets) for (path, class index) samples.

    In sample order, or in `sampler`'s order (e.g. a DistributedSampler shard) when one is given. `model`
    must already be on `device` (see `prepare_for_device`, `prepare_for_inference`). The DataLoader gets its
    own generator, so predicting never draws from the global RNG and a seeded training run stays
    reproducible around it.
    """
    loader = torch.utils.data.DataLoader(
        ImageSamples(samples, transform), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == 'cuda', generator=torch.Generator())
    return predict_loader(model, loader, device, progress, amp)
