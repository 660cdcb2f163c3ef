"""Image-folder data for fine-tuning: what is readable, how it splits, and how it is transformed.

Every file is decoded once up front (at reduced JPEG scale, so it is cheap) instead of failing inside
a DataLoader worker: an unreadable file is then skipped with a warning and counted before training
starts, every epoch sees the same samples, and all DDP ranks agree on the dataset length.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..errors import ResNetV2ZooError

__all__ = [
    'DataSplits', 'ImageSamples', 'load_rgb', 'to_rgb', 'scan_image_folder', 'stratified_split', 'load_splits',
    'data_config_for', 'build_transforms', 'image_files_under',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
Sample = Tuple[str, int]
# Letterbox colour for transparent pixels: white, as image viewers show them.
ALPHA_BACKGROUND = (255, 255, 255)
# Extra train-time augmentation on top of timm's defaults: a fine-tune set is small, so crops stay large.
TRAIN_CROP_SCALE = (0.35, 1.0)
TRAIN_COLOR_JITTER = 0.2


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit grey is rescaled (Pillow would clip it), alpha lies on white."""
    if img.mode.startswith('I'):
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 16-bit range to 8-bit
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'F':
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode='L')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')


def load_rgb(path: PathLike) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def _unreadable_reason(path: str) -> Optional[str]:
    """None if `path` decodes completely as an image, else why not."""
    try:
        with Image.open(path) as img:
            img.draft('RGB', (64, 64))  # JPEG: decode at 1/8 scale; still reads (and checks) the whole stream
            img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f'{type(e).__name__}: {e}'
    return None


@dataclass
class FolderScan:
    classes: List[str]
    samples: List[Sample]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)


def scan_image_folder(root: PathLike, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Readable samples of an ImageFolder tree (`root/<class>/<image>`); unreadable files are skipped.

    `classes` fixes the class list (a validation folder must match the training one).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ResNetV2ZooError(f'data folder {root} does not exist')
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise ResNetV2ZooError(
                f'{root} has {len(classes)} class folder(s) ({", ".join(classes) or "none"}); a classifier needs at '
                f'least 2: lay it out as {root}/<class name>/<image files>')
    elif sorted(found) != sorted(classes):
        raise ResNetV2ZooError(f'{root} has class folders {found}, expected the training classes {list(classes)}')
    class_to_idx = {name: i for i, name in enumerate(classes)}
    candidates = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    samples, skipped, seen, repeats = [], [], set(), 0
    for path, target in candidates:
        # make_dataset follows symlinks: a link back up the tree (a loop) repeats files until the OS stops it
        # with ELOOP, and a linked copy would leak a training image into validation. Keep one path per file.
        real_path = os.path.realpath(path)
        if real_path in seen:
            repeats += 1
            continue
        seen.add(real_path)
        reason = _unreadable_reason(path)
        if reason is None:
            samples.append((path, target))
        else:
            skipped.append((path, reason))
            _logger.warning('skipping unreadable image %s (%s)', path, reason)
    if repeats:
        _logger.warning('%d paths under %s lead to files already listed (symbolic links); each file is used once',
                        repeats, root)
    counts = np.bincount([t for _, t in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ResNetV2ZooError(
            f'class folder(s) {", ".join(os.path.join(root, c) for c in empty)} hold no readable image '
            f'(extensions {", ".join(IMG_EXTENSIONS)}); add images or remove the folder')
    return FolderScan(list(classes), samples, skipped)


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Seeded per-class split: each class gives round(n * val_fraction) images (at least one if n >= 2) to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ResNetV2ZooError(f'--val-split must be between 0 and 1, got {val_fraction}')
    rng = np.random.default_rng(seed)
    train, val = [], []
    for target in sorted({t for _, t in samples}):
        members = [s for s in samples if s[1] == target]
        order = rng.permutation(len(members))
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


@dataclass
class DataSplits:
    classes: List[str]
    train: List[Sample]
    val: List[Sample]
    skipped: List[Tuple[str, str]]


def load_splits(data: PathLike, val_data: Optional[PathLike] = None, val_split: float = 0.2,
                seed: int = 0) -> DataSplits:
    """Training and validation samples: `val_data` if given, else a seeded stratified split of `data`."""
    scan = scan_image_folder(data)
    if val_data is not None:
        val_scan = scan_image_folder(val_data, scan.classes)
        return DataSplits(scan.classes, scan.samples, val_scan.samples, scan.skipped + val_scan.skipped)
    train, val = stratified_split(scan.samples, val_split, seed)
    return DataSplits(scan.classes, train, val, scan.skipped)


class ImageSamples(torch.utils.data.Dataset):
    """(path, class index) pairs, loaded as RGB and transformed."""

    def __init__(self, samples: Sequence[Sample], transform: Optional[Any] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform is not None else img), target


def data_config_for(model: torch.nn.Module, img_size: Optional[int] = None) -> Dict[str, Any]:
    """timm's data config from the model's pretrained cfg (Keras [-1, 1] normalization), at `img_size` if given."""
    config = resolve_data_config({}, model=model)
    if img_size is not None:
        config['input_size'] = (3, img_size, img_size)
    return config


def build_transforms(model: torch.nn.Module, img_size: Optional[int] = None, augment: bool = True) -> Tuple[Any, Any]:
    """(train, eval) transforms; without `augment` training sees exactly what evaluation sees."""
    config = data_config_for(model, img_size)
    eval_transform = create_transform(**config)
    if not augment:
        return eval_transform, eval_transform
    train_transform = create_transform(**config, is_training=True, scale=TRAIN_CROP_SCALE,
                                       color_jitter=TRAIN_COLOR_JITTER)
    return train_transform, eval_transform


def image_files_under(paths: Sequence[PathLike]) -> List[str]:
    """Files named on the command line, and image files found (recursively, sorted) under named folders."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                            if f.lower().endswith(IMG_EXTENSIONS))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ResNetV2ZooError(f'no file or folder at {path}')
    return files
