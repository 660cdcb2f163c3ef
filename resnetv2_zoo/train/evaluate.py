"""`resnetv2-zoo evaluate CHECKPOINT --data DIR`: accuracy, per-class precision/recall/F1, confusion matrix.

The held-out folder may hold any subset of the checkpoint's classes (one included): each folder name is
mapped to the checkpoint's class index. Nothing is written unless `--plot PATH` asks for the figure.
`--split keras --val-split F --seed N --subset validation` evaluates exactly the files Keras's
`image_dataset_from_directory(validation_split=F, subset='validation', seed=N)` takes, and `--pipeline keras`
feeds the model its pixels: Keras and PyTorch can then be compared on the same validation images.
`evaluate()` is the Python API (`resnetv2_zoo.evaluate`); the command is a thin layer over it.
"""
import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.utils import natural_key

from ..argtypes import DefaultsHelpFormatter, fraction, image_size, non_negative_int, optional_path, positive_int
from ..errors import ResNetV2ZooError
from .data import _class_folders, build_transforms, scan_keras_split, scan_labelled_folder
from .keras_pipeline import KERAS_SUBSETS, PIPELINE_HELP, PIPELINES, check_pipeline
from .runtime import (
    AMP_CHOICES,
    check_checkpoint,
    label_names_of,
    load_classifier,
    pick_device,
    predict_samples,
    prepare_for_inference,
    resolve_amp,
)

__all__ = ['ClassReport', 'Report', 'classification_report', 'format_report', 'evaluate', 'evaluate_folder']

_logger = logging.getLogger(__name__)
# evaluate --split: the whole folder, or one subset of Keras's validation_split
EVALUATE_SPLITS = ('all', 'keras')


@dataclass
class ClassReport:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Report:
    accuracy: float
    num_images: int
    classes: List[ClassReport]
    confusion: List[List[int]]  # rows: true class, columns: predicted class
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable files left out
    animated: List[str] = field(default_factory=list)  # multi-frame images, scored on their first frame
    plot: Optional[str] = None  # the confusion matrix PNG, when one was asked for

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(targets * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, num_classes)


def classification_report(predicted: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                          only_seen: bool = False) -> Report:
    """Accuracy and per-class metrics over `class_names` (indexed like the logits).

    With `only_seen`, classes that are neither in `targets` nor predicted are left out of the table and
    the matrix. Their rows and columns are all zero, so nothing else changes, and a 3-folder evaluation
    of a 1000-class model gets a 3-to-few-row report rather than a 1000 x 1000 one.
    """
    matrix = confusion_matrix(predicted, targets, len(class_names)).double()
    if only_seen:
        seen = torch.nonzero(matrix.sum(0) + matrix.sum(1)).flatten()
        matrix = matrix[seen][:, seen]
        class_names = [class_names[i] for i in seen.tolist()]
    hits = matrix.diagonal()
    precision = hits / matrix.sum(0).clamp(min=1)
    recall = hits / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    classes = [ClassReport(name, float(p), float(r), float(f), int(n))
               for name, p, r, f, n in zip(class_names, precision, recall, f1, matrix.sum(1))]
    return Report(float(hits.sum() / max(len(targets), 1)), len(targets), classes, matrix.long().tolist())


def format_report(report: Report) -> str:
    width = max(12, *(len(c.name) for c in report.classes))
    lines = [f'accuracy {100 * report.accuracy:.2f}% on {report.num_images} images', '',
             f'{"class":<{width}}  precision  recall     f1  support']
    lines += [f'{c.name:<{width}}  {c.precision:9.3f}  {c.recall:6.3f}  {c.f1:5.3f}  {c.support:7d}'
              for c in report.classes]
    lines += ['', 'confusion matrix (rows: true, columns: predicted)',
              ' ' * width + '  ' + ' '.join(f'{i:>5d}' for i in range(len(report.classes)))]
    lines += [f'{c.name:<{width}}  ' + ' '.join(f'{n:5d}' for n in row)
              for c, row in zip(report.classes, report.confusion)]
    if report.skipped:
        lines += ['', f'{len(report.skipped)} unreadable file(s) left out:']
        lines += _listed([f'  {path}  ({reason})' for path, reason in report.skipped])
    if report.animated:
        lines += ['', f'{len(report.animated)} animated image(s) scored on their first frame:']
        lines += _listed([f'  {path}' for path in report.animated])
    return '\n'.join(lines)


def _listed(lines: List[str], limit: int = 10) -> List[str]:
    return lines if len(lines) <= limit else lines[:limit] + [f'  ... and {len(lines) - limit} more (--json lists all)']


def class_index(model: torch.nn.Module) -> Tuple[Dict[str, int], Dict[str, List[int]]]:
    """(folder name -> class index, name -> indices for names shared by several classes).

    Names are the checkpoint's label names and, for ImageNet, also its WordNet ids (n01440764): timm's
    ImageNet descriptions name two classes 'crane' (the bird and the machine), which only the ids tell apart.
    """
    names = label_names_of(model)
    raw = list(model.pretrained_cfg.get('label_names') or [])
    indices: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        indices.setdefault(name, []).append(i)
    if len(raw) == len(names):
        for i, name in enumerate(raw):
            indices.setdefault(name, [i])
    index = {name: found[0] for name, found in indices.items() if len(found) == 1}
    return index, {name: found for name, found in indices.items() if len(found) > 1}


def _unnamed_class_index(model: torch.nn.Module, data: str, checkpoint: str,
                         keras_order: bool = False) -> Dict[str, int]:
    """A checkpoint without class names: folders numbered as timm's ImageFolder numbers them (`natural_key`:
    case-blind, numbers by value), or with `keras_order` as `image_dataset_from_directory` does (plain `sorted`)."""
    folders = sorted(_class_folders(data), key=None if keras_order else natural_key)
    if len(folders) != model.num_classes:
        raise ResNetV2ZooError(
            f'{checkpoint} does not name its {model.num_classes} classes, so {data} must hold exactly that many class '
            f'folders, numbered in sorted order as timm train.py numbered them; found {len(folders)}')
    _logger.info(f'{checkpoint} does not name its classes: taking the {len(folders)} folders of {data} in sorted '
                 f'order, as {"Keras" if keras_order else "timm train.py"} numbers them')
    return {name: i for i, name in enumerate(folders)}


def evaluate(checkpoint: str, data: str, batch_size: int = 32, workers: int = 0, img_size: Optional[int] = None,
             device: Optional[str] = None, amp: str = 'auto', optimize: bool = True, progress: bool = False,
             plot: Optional[str] = None, pipeline: str = 'timm', split: str = 'all', val_split: Optional[float] = None,
             seed: Optional[int] = None, subset: str = 'validation') -> Report:
    """Evaluate a checkpoint on an ImageFolder tree whose class folders are some or all of its classes.

    Args:
        checkpoint: a fine-tuning run directory, a model directory, a `.safetensors` file, a timm train.py
            checkpoint (`.pth.tar`, read with `weights_only=True`), or a timm model name (pretrained).
        data: folder of class folders named as the checkpoint names its classes (any subset).
        batch_size, workers: of the DataLoader.
        img_size: input resolution; default the checkpoint's.
        device: 'cpu', 'cuda', 'cuda:1', ...; default CUDA when available.
        amp: 'auto' (bf16 or fp16 on CUDA, float32 on the CPU), 'none', 'bf16' (CUDA or CPU), 'fp16' (CUDA).
        optimize: run the inference-optimized model (BatchNorms folded, channels_last; see
            `models.optimize`), the same function up to float32 round-off; False runs the model as loaded.
        progress: a progress bar on stderr when there is more than one batch.
        plot: also write the confusion matrix as a PNG to this path (checked before any work).
        pipeline: 'timm' (the model's resize, centre crop, mean/std) or 'keras' (image_dataset_from_directory's
            pixels: squashed to `img_size` with bilinear resizing, no antialiasing, no crop; the model's mean/std).
        split: 'all' (every image of `data`) or 'keras': only the `subset` ('validation' or 'training') that
            `image_dataset_from_directory(data, validation_split=val_split, subset=subset, seed=seed)` takes,
            in its order (`val_split` and `seed` are then required).

    Returns:
        A `Report`: accuracy, per-class precision/recall/F1/support, confusion matrix, skipped files.
    """
    check_checkpoint(checkpoint)
    pipeline = check_pipeline(pipeline)
    check_split_options(split, val_split, seed, subset)
    plot_path = check_plot_path(plot) if plot else None  # before the work, so a bad path costs nothing
    torch_device = pick_device(device)
    dtype = resolve_amp(torch_device, amp)
    model = load_classifier(checkpoint)
    names = label_names_of(model)
    if not model.pretrained_cfg.get('label_names') and model.num_classes != 1000:
        index = _unnamed_class_index(model, data, checkpoint, keras_order=split == 'keras')
        names = list(index)
    else:
        index, ambiguous = class_index(model)
        shared = {name: found for name, found in ambiguous.items() if os.path.isdir(os.path.join(data, name))}
        if shared:
            raise ResNetV2ZooError(f'{data}: class folder name(s) {shared} (name: class indices) name more than one '
                                   f'class of {checkpoint}; rename each to the class id the checkpoint uses for it')
    if split == 'keras':
        subsets = scan_keras_split(data, val_split, seed, index, owner=checkpoint)
        scan = subsets[KERAS_SUBSETS.index(subset)]
    else:
        scan = scan_labelled_folder(data, index, owner=checkpoint)
    transform = build_transforms(model, img_size, augment=False, pipeline=pipeline)[1]
    logits, targets = predict_samples(prepare_for_inference(model, torch_device, optimize), scan.samples, transform,
                                      torch_device, batch_size=batch_size, workers=workers, progress=progress,
                                      amp=dtype)
    report = classification_report(logits.argmax(1), targets, names, only_seen=True)
    report.skipped, report.animated = scan.skipped, scan.animated
    if plot_path is not None:
        from .plots import save_confusion

        save_confusion(torch.tensor(report.confusion), [c.name for c in report.classes], plot_path)
        report.plot = str(plot_path)
    return report


def evaluate_folder(checkpoint: str, data: str, batch_size: int = 32, workers: int = 0,
                    img_size: Optional[int] = None, progress: bool = False, **options: Any) -> Report:
    """`evaluate` under its earlier name."""
    return evaluate(checkpoint, data, batch_size=batch_size, workers=workers, img_size=img_size, progress=progress,
                    **options)


def check_split_options(split: str, val_split: Optional[float], seed: Optional[int], subset: str) -> None:
    """`--split keras` needs Keras's `validation_split` and `seed`; they mean nothing without it."""
    if split not in EVALUATE_SPLITS:
        raise ResNetV2ZooError(f'--split {split}: expected one of {", ".join(EVALUATE_SPLITS)}')
    if subset not in KERAS_SUBSETS:
        raise ResNetV2ZooError(f'--subset {subset}: expected one of {", ".join(KERAS_SUBSETS)}')
    if split == 'keras' and (val_split is None or seed is None):
        raise ResNetV2ZooError('--split keras needs --val-split F and --seed N, the validation_split and seed given '
                               'to image_dataset_from_directory (the Keras tutorial: --val-split 0.2 --seed 123)')
    if split != 'keras' and (val_split is not None or seed is not None):
        raise ResNetV2ZooError('--val-split and --seed choose a Keras validation split: add --split keras '
                               '(without it the whole --data folder is evaluated)')


def check_plot_path(path: str) -> Path:
    """Where `--plot` may write: a .png in an existing folder, replacing only a PNG file (a previous plot)."""
    plot = Path(path)
    if plot.suffix.lower() != '.png':
        raise ResNetV2ZooError(f'--plot {path}: the confusion matrix is written as PNG; name it *.png')
    if not plot.parent.is_dir():
        raise ResNetV2ZooError(f'--plot {path}: folder {plot.parent} does not exist')
    if plot.is_dir() or (plot.exists() and not _is_png(plot)):
        raise ResNetV2ZooError(f'--plot {path}: exists and is not a PNG image; refusing to replace it')
    return plot


def _is_png(path: Path) -> bool:
    try:
        with open(path, 'rb') as f:
            return f.read(8) == b'\x89PNG\r\n\x1a\n'
    except OSError:
        return False


def run_evaluate(args: argparse.Namespace) -> None:
    report = evaluate(args.checkpoint, args.data, args.batch_size, args.workers, args.img_size, device=args.device,
                      amp=args.amp, optimize=args.optimize, progress=args.progress, plot=args.plot,
                      pipeline=args.pipeline, split=args.split, val_split=args.val_split, seed=args.seed,
                      subset=args.subset)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
        if report.plot is not None:
            print(f'\nconfusion matrix plot: {report.plot}')


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """--device, --amp, --no-optimize, --no-progress: shared by `evaluate` and `predict`."""
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1, ... (default: cuda when available)')
    parser.add_argument('--amp', choices=AMP_CHOICES, default='auto',
                        help='autocast precision: auto is bf16 (fp16 without bf16) on CUDA and float32 on the CPU; '
                             'bf16 runs on CUDA and the CPU; fp16 needs CUDA')
    parser.add_argument('--no-optimize', dest='optimize', action='store_false',
                        help='run the model as loaded, not the inference-optimized copy (BatchNorms folded into the '
                             'convolutions, channels_last: same result up to float32 round-off, faster)')
    parser.add_argument('--no-progress', dest='progress', action='store_false',
                        help='no progress bar (it is shown on stderr when there is more than one batch)')


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('evaluate', help='accuracy, per-class precision/recall/F1 and confusion matrix',
                            formatter_class=DefaultsHelpFormatter,
                            description='Evaluate a checkpoint (run directory, model directory, .safetensors file, '
                                        'timm train.py .pth.tar or timm model name) on an ImageFolder tree whose '
                                        'class folders are some or all of its classes. Writes no file unless --plot '
                                        'is given.')
    parser.add_argument('checkpoint')
    parser.add_argument('--data', required=True,
                        help='folder of class folders, named as the checkpoint names its classes (any subset)')
    parser.add_argument('--batch-size', type=positive_int, default=32, help='images per batch')
    parser.add_argument('--workers', type=non_negative_int, default=0, help='DataLoader worker processes')
    parser.add_argument('--img-size', type=image_size, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--pipeline', choices=PIPELINES, default='timm', help=PIPELINE_HELP)
    split = parser.add_argument_group('Keras validation split (image_dataset_from_directory)')
    split.add_argument('--split', choices=EVALUATE_SPLITS, default='all',
                       help='all: every image in --data; keras: only the --subset that image_dataset_from_directory('
                            'DIR, validation_split=F, subset=..., seed=N) takes (its .bmp .gif .jpeg .jpg .png files)')
    split.add_argument('--val-split', type=fraction, default=None, metavar='F',
                       help='with --split keras: the validation_split given to Keras (the tutorial: 0.2)')
    split.add_argument('--seed', type=non_negative_int, default=None, metavar='N',
                       help='with --split keras: the seed given to Keras (the tutorial: 123)')
    split.add_argument('--subset', choices=KERAS_SUBSETS, default='validation',
                       help='with --split keras: which of the two subsets to evaluate')
    parser.add_argument('--plot', type=optional_path, default=None, metavar='PATH',
                        help='also write the confusion matrix as a PNG figure to PATH')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    add_inference_options(parser)
    parser.set_defaults(func=run_evaluate)
