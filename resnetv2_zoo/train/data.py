"""Image-folder data for fine-tuning: what is readable, how it splits, and how it is transformed.

Every file is decoded once up front (at reduced JPEG scale, so it is cheap) instead of failing inside
a DataLoader worker: an unreadable file is then skipped with a warning and counted before training
starts, every epoch sees the same samples, and all DDP ranks agree on the dataset length.

Hidden files and folders (names starting with '.', which includes macOS `._*` AppleDouble files) and
`__MACOSX` folders are metadata, not images: they are left out silently. An animated (multi-frame) image
is used through its first frame, as PIL opens it; it is counted so that reports can say so.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..errors import ResNetV2ZooError
from .keras_pipeline import KERAS_IMAGE_EXTENSIONS, KerasImageTransform, check_pipeline, keras_subsets

__all__ = [
    'IMAGE_EXTENSIONS', 'DataSplits', 'FolderScan', 'ImageCheck', 'ImageSamples', 'load_rgb', 'to_rgb', 'check_images',
    'scan_image_folder', 'scan_labelled_folder', 'stratified_split', 'DataLayout', 'find_layout', 'load_splits',
    'data_config_for', 'build_transforms', 'image_files_under', 'SPLITS', 'scan_keras_split',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
Sample = Tuple[str, int]
# torchvision's list plus GIF, which PIL reads (an animated one through its first frame).
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + ('.gif',)
# A folder of Finder metadata that macOS zip archives carry beside the real content.
MACOS_METADATA_DIR = '__MACOSX'
# Letterbox colour for transparent pixels: white, as image viewers show them.
ALPHA_BACKGROUND = (255, 255, 255)
# Extra train-time augmentation on top of timm's defaults: a fine-tune set is small, so crops stay large.
TRAIN_CROP_SCALE = (0.35, 1.0)
TRAIN_COLOR_JITTER = 0.2
# How `--val-split` splits a folder: our seeded per-class split, or exactly Keras's `validation_split`.
SPLITS = ('stratified', 'keras')


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


def is_hidden(name: str) -> bool:
    """Dot-names (hidden files, macOS `._*` AppleDouble resource forks) and macOS zip metadata folders."""
    return name.startswith('.') or name == MACOS_METADATA_DIR


@dataclass
class ImageCheck:
    """The outcome of decoding a list of files once: what is usable, what is not and why."""
    readable: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    animated: List[str] = field(default_factory=list)  # readable files with more than one frame


def _probe(path: str) -> Tuple[Optional[str], bool]:
    """(None if `path` decodes completely as an image, else why not; whether it has more than one frame)."""
    try:
        with Image.open(path) as img:
            img.draft('RGB', (64, 64))  # JPEG: decode at 1/8 scale; still reads (and checks) the whole stream
            img.load()
            return None, bool(getattr(img, 'is_animated', False))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f'{type(e).__name__}: {e}', False


def check_images(paths: Sequence[str]) -> ImageCheck:
    """Decode each file once; unreadable ones are logged (one warning each) and left out, animated ones noted."""
    check = ImageCheck()
    for path in paths:
        reason, animated = _probe(path)
        if reason is not None:
            check.skipped.append((path, reason))
            _logger.warning('skipping unreadable image %s (%s)', path, reason)
            continue
        check.readable.append(path)
        if animated:
            check.animated.append(path)
    if check.animated:
        shown = ', '.join(check.animated[:5]) + (', ...' if len(check.animated) > 5 else '')
        _logger.info('%d animated image(s), each used through its first frame: %s', len(check.animated), shown)
    return check


@dataclass
class FolderScan:
    classes: List[str]
    samples: List[Sample]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    animated: List[str] = field(default_factory=list)  # used through their first frame


def _class_folders(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise ResNetV2ZooError(f'data folder {root} does not exist')
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))


def scan_image_folder(root: PathLike, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Readable samples of an ImageFolder tree (`root/<class>/<image>`); unreadable files are skipped.

    `classes` fixes the class list (a validation folder must match the training one).
    """
    root = os.fspath(root)
    found = _class_folders(root)
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise ResNetV2ZooError(
                f'{root} has {len(classes)} class folder(s) ({", ".join(classes) or "none"}); a classifier needs at '
                f'least 2: lay it out as {root}/<class name>/<image files>')
    elif sorted(found) != sorted(classes):
        raise ResNetV2ZooError(f'{root} has class folders {found}, expected the training classes {list(classes)}')
    return _scan(root, list(classes), {name: i for i, name in enumerate(classes)})


def scan_labelled_folder(root: PathLike, class_to_idx: Mapping[str, int], owner: str = 'the model') -> FolderScan:
    """Samples of an ImageFolder tree whose class folders are any non-empty subset of a model's classes.

    Targets are the model's class indices (`class_to_idx[folder name]`), so a held-out folder with one
    class, or a few of many, is scored against the model's full head. `FolderScan.classes` lists the
    folders found. A folder the model (`owner`, for messages) does not know is refused, naming it.
    """
    root = os.fspath(root)
    found = _class_folders(root)
    if not found:
        raise ResNetV2ZooError(f'{root} has no class folder: lay it out as {root}/<class name>/<image files>')
    unknown = [name for name in found if name not in class_to_idx]
    if unknown:
        known = list(class_to_idx)
        shown = ', '.join(map(repr, known[:10])) + (f', ... ({len(known)} in all)' if len(known) > 10 else '')
        raise ResNetV2ZooError(f'{root} has class folders {unknown} that {owner} does not know; its classes are '
                               f'{shown}')
    return _scan(root, found, {name: class_to_idx[name] for name in found})


def _scan(root: str, classes: List[str], class_to_idx: Mapping[str, int]) -> FolderScan:
    """Decode-checked samples of the class folders in `class_to_idx`; every one must keep a readable image."""
    def is_image_file(path: str) -> bool:
        parts = os.path.relpath(path, root).split(os.sep)
        return path.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(part) for part in parts)

    candidates = make_dataset(root, dict(class_to_idx), is_valid_file=is_image_file, allow_empty=True)
    unique, seen, repeats = [], set(), 0
    for path, target in candidates:
        # make_dataset follows symlinks: a link back up the tree (a loop) repeats files until the OS stops it
        # with ELOOP, and a linked copy would leak a training image into validation. Keep one path per file.
        real_path = os.path.realpath(path)
        if real_path in seen:
            repeats += 1
            continue
        seen.add(real_path)
        unique.append((path, target))
    if repeats:
        _logger.warning('%d paths under %s lead to files already listed (symbolic links); each file is used once',
                        repeats, root)
    check = check_images([path for path, _ in unique])
    readable = set(check.readable)
    samples = [(path, target) for path, target in unique if path in readable]
    present = {target for _, target in samples}
    empty = [name for name in classes if class_to_idx[name] not in present]
    if empty:
        raise ResNetV2ZooError(
            f'class folder(s) {", ".join(os.path.join(root, c) for c in empty)} hold no readable image '
            f'(extensions {", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder')
    return FolderScan(classes, samples, check.skipped, check.animated)


def scan_keras_split(root: PathLike, val_split: float, seed: int, class_to_idx: Optional[Mapping[str, int]] = None,
                     owner: str = 'the model') -> Tuple[FolderScan, FolderScan]:
    """(training, validation) of `root` exactly as `image_dataset_from_directory(root, validation_split=val_split,
    subset=..., seed=seed)` takes them (see `keras_pipeline.keras_subsets`), each in Keras's order.

    Targets are the class indices of Keras's sorted class folders, or `class_to_idx[folder]` (a checkpoint's
    classes; `owner` names it) when given. Every file is decode-checked once: one Keras would fail on is
    skipped with a warning, after the split, so the readable files keep Keras's lists.
    """
    subsets, classes = keras_subsets(root, val_split, seed)
    if class_to_idx is None:
        if len(classes) < 2:
            raise ResNetV2ZooError(
                f'{root} has {len(classes)} class folder(s) ({", ".join(classes) or "none"}); a classifier needs at '
                f'least 2: lay it out as {root}/<class name>/<image files>')
        class_to_idx = {name: i for i, name in enumerate(classes)}
    else:
        unknown = [name for name in classes if name not in class_to_idx]
        if unknown:
            raise ResNetV2ZooError(f'{root} has class folders {unknown} that {owner} does not know')
    check = check_images([path for paths, _ in subsets.values() for path in paths])
    readable, animated = set(check.readable), set(check.animated)
    skipped = dict(check.skipped)
    empty = sorted(set(classes) - {classes[label] for paths, labels in subsets.values()
                                   for path, label in zip(paths, labels) if path in readable})
    if empty:
        raise ResNetV2ZooError(
            f'class folder(s) {", ".join(os.path.join(os.fspath(root), c) for c in empty)} hold no readable image '
            f'of the types Keras lists ({", ".join(KERAS_IMAGE_EXTENSIONS)}); add images or remove the folder')
    scans = []
    for paths, labels in subsets.values():
        scans.append(FolderScan(
            list(classes), [(path, class_to_idx[classes[label]]) for path, label in zip(paths, labels)
                            if path in readable],
            [(path, skipped[path]) for path in paths if path in skipped], [path for path in paths if path in animated]))
    return scans[0], scans[1]


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
    animated: List[str] = field(default_factory=list)  # used through their first frame
    layout: Optional['DataLayout'] = None  # the folders they came from
    test: List[Sample] = field(default_factory=list)  # the dataset root's test/ images (class indices of `classes`)


# Split folder names of a dataset root, as timm's train.py (and torchvision, Kaggle, weather4) lay them out.
TRAIN_SPLIT = 'train'
VAL_SPLITS = ('val', 'valid', 'validation')
TEST_SPLIT = 'test'
SPLIT_NAMES = (TRAIN_SPLIT, *VAL_SPLITS, TEST_SPLIT)


@dataclass
class DataLayout:
    """Which folders hold which split: `train` always; `val` and `test` when the dataset has them."""
    train: str
    val: Optional[str] = None
    test: Optional[str] = None
    description: str = ''  # one line for the log: which layout was taken

    @property
    def is_split_root(self) -> bool:
        return self.description.startswith('dataset root')


def _holds_images_directly(folder: str) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(e.name)
               for e in os.scandir(folder))


def find_layout(data: PathLike, val_data: Optional[PathLike] = None) -> DataLayout:
    """Where the training, validation and test images of `--data` are.

    A dataset root (`data/train/<class>/...` beside `val/` (or `valid/`, `validation/`) and `test/`, the
    layout of timm's train.py) uses those folders; otherwise `data` itself is one ImageFolder of class
    folders. A folder named like a split is never taken as a class: a root mixing split folders with
    other folders, split folders without `train/`, or a `train/` holding images instead of class folders
    is refused, saying why. An explicit `val_data` overrides the root's validation folder.
    """
    root = os.fspath(data)
    folders = _class_folders(root)
    splits = [name for name in folders if name.lower() in SPLIT_NAMES]
    if not splits:
        val = os.fspath(val_data) if val_data is not None else None
        how = f'validation from {val}' if val is not None else 'validation split off it'
        return DataLayout(root, val, None, f'class folders in {root} ({how})')
    others = [name for name in folders if name.lower() not in SPLIT_NAMES]
    exact = {name.lower(): name for name in splits}
    if others or TRAIN_SPLIT not in exact:
        found = ', '.join(f'{name}/' for name in splits)
        problem = (f'mixes split folder(s) {found} with other folders ({", ".join(others[:5])})' if others
                   else f'has split folder(s) {found} but no train/')
        raise ResNetV2ZooError(
            f'{root} {problem}: a folder named like a split is never taken as a class. Use a dataset root of '
            f'train/ [val/] [test/] folders of class folders, or a folder of class folders none named '
            f'{"/".join(SPLIT_NAMES)} (rename such a class folder)')
    train = os.path.join(root, exact[TRAIN_SPLIT])
    if _holds_images_directly(train) and not _class_folders(train):
        raise ResNetV2ZooError(
            f'{train} holds images, not class folders: if {", ".join(splits)} are your classes, rename them; as a '
            f'dataset root, {root} needs train/<class>/<images>')
    val_name = next((exact[name] for name in VAL_SPLITS if name in exact), None)
    if val_data is not None:
        val, val_how = os.fspath(val_data), f'validation from --val-data {os.fspath(val_data)}'
    elif val_name is not None:
        val, val_how = os.path.join(root, val_name), f'{val_name}/ for validation'
    else:
        val, val_how = None, 'validation split off train/'
    test = os.path.join(root, exact[TEST_SPLIT]) if TEST_SPLIT in exact else None
    test_how = ', test/ for the final report' if test is not None else ''
    return DataLayout(train, val, test, f'dataset root {root}: train/ for training, {val_how}{test_how}')


def load_splits(data: PathLike, val_data: Optional[PathLike] = None, val_split: float = 0.2,
                seed: int = 0, split: str = 'stratified') -> DataSplits:
    """Training and validation samples of `data` (see `find_layout`): a validation folder if there is one, else a
    seeded split of the training images: `split='stratified'` per class, `split='keras'` exactly as
    `image_dataset_from_directory(validation_split=val_split, subset=..., seed=seed)` splits (Keras's file
    types only)."""
    if split not in SPLITS:
        raise ResNetV2ZooError(f'--split {split}: expected one of {", ".join(SPLITS)}')
    layout = find_layout(data, val_data)
    if split == 'keras':
        if layout.val is not None:
            raise ResNetV2ZooError(
                f'--split keras splits one folder as Keras\'s validation_split does, but {layout.description}: '
                f'nothing is split. Drop --split keras, or give --data the one folder of class folders to split')
        train, val = scan_keras_split(layout.train, val_split, seed)
        test = FolderScan(train.classes, [])
        if layout.test is not None:
            test = scan_labelled_folder(layout.test, {name: i for i, name in enumerate(train.classes)},
                                        owner=f'the training set ({layout.train})')
        layout.description += f' (split as Keras: validation_split={val_split}, seed={seed})'
        return DataSplits(train.classes, train.samples, val.samples, train.skipped + val.skipped + test.skipped,
                          train.animated + val.animated + test.animated, layout, test.samples)
    scan = scan_image_folder(layout.train)
    test = FolderScan(scan.classes, [])
    if layout.test is not None:  # checked now, not after training: any subset of the training classes
        test = scan_labelled_folder(layout.test, {name: i for i, name in enumerate(scan.classes)},
                                    owner=f'the training set ({layout.train})')
    if layout.val is not None:
        val_scan = scan_image_folder(layout.val, scan.classes)
        return DataSplits(scan.classes, scan.samples, val_scan.samples, scan.skipped + val_scan.skipped + test.skipped,
                          scan.animated + val_scan.animated + test.animated, layout, test.samples)
    train, val = stratified_split(scan.samples, val_split, seed)
    return DataSplits(scan.classes, train, val, scan.skipped + test.skipped, scan.animated + test.animated, layout,
                      test.samples)


class ImageSamples(torch.utils.data.Dataset):
    """(path, class index) pairs, loaded as RGB and transformed.

    A transform with a `load(path)` method reads the file itself (the Keras pipeline decodes as TensorFlow
    does); otherwise `load_rgb` reads it.
    """

    def __init__(self, samples: Sequence[Sample], transform: Optional[Any] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        img = getattr(self.transform, 'load', load_rgb)(path)
        return (self.transform(img) if self.transform is not None else img), target


def data_config_for(model: torch.nn.Module, img_size: Optional[int] = None) -> Dict[str, Any]:
    """timm's data config from the model's pretrained cfg (Keras [-1, 1] normalization), at `img_size` if given."""
    config = resolve_data_config({}, model=model)
    if img_size is not None:
        config['input_size'] = (3, img_size, img_size)
    return config


def build_transforms(model: torch.nn.Module, img_size: Optional[int] = None, augment: bool = True,
                     pipeline: str = 'timm') -> Tuple[Any, Any]:
    """(train, eval) transforms; without `augment` training sees exactly what evaluation sees.

    `pipeline='keras'` evaluates on `image_dataset_from_directory`'s pixels (`keras_pipeline`), squashed to the
    input size, with the model's mean/std; training then sees the same without `augment`, timm's augmentation
    with it.
    """
    config = data_config_for(model, img_size)
    if check_pipeline(pipeline) == 'keras':
        eval_transform = KerasImageTransform(config['input_size'][-2:], config['mean'], config['std'])
    else:
        eval_transform = create_transform(**config)
    if not augment:
        return eval_transform, eval_transform
    train_transform = create_transform(**config, is_training=True, scale=TRAIN_CROP_SCALE,
                                       color_jitter=TRAIN_COLOR_JITTER)
    return train_transform, eval_transform


def _walk_images(folder: str) -> List[str]:
    files = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not is_hidden(d)]
        files += [os.path.join(directory, f) for f in names
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(f)]
    return sorted(files)


def image_files_under(paths: Sequence[PathLike]) -> List[str]:
    """Files named on the command line, and image files found (recursively, sorted, hidden ones left out) under
    named folders."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            files += _walk_images(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ResNetV2ZooError(f'no file or folder at {path}')
    return files
