"""`resnetv2-zoo demo`: the tutorial's whole workflow in one command, on the CPU in about two minutes.

Without `--data` it first draws a small synthetic 4-class image set (deterministic, so every run sees the
same images); with `--data` it does the same on real photos: fine-tune, evaluate, predict, and say where
every output is.
"""
import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from ..argtypes import DefaultsHelpFormatter, image_size, non_negative_int, positive_int
from .data import find_layout
from .evaluate import evaluate_folder, format_report
from .finetune import finetune_args, output_lines, run_finetune
from .predict import predict_files
from .resume import check_out

__all__ = ['SYNTHETIC_CLASSES', 'DemoResult', 'demo', 'make_synthetic_dataset', 'run_demo']

# Each class is a shape in its own colour family on a noisy background: learnable in a few hundred steps.
SYNTHETIC_CLASSES: Dict[str, Tuple[str, Tuple[int, int, int]]] = {
    'red disc': ('disc', (200, 40, 40)),
    'blue square': ('square', (40, 70, 200)),
    'green stripes': ('stripes', (40, 160, 60)),
    'yellow triangle': ('triangle', (220, 200, 40)),
}


def _draw_synthetic(shape: str, color: Tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(60, 190, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(c) for c in np.clip(np.array(color) + rng.integers(-35, 36, 3), 0, 255))
    extent = int(rng.integers(size // 3, size * 3 // 4))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == 'disc':
        draw.ellipse(box, fill=fill)
    elif shape == 'square':
        draw.rectangle(box, fill=fill)
    elif shape == 'triangle':
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:  # stripes across the whole image
        period = int(rng.integers(6, 12))
        for y in range(int(rng.integers(0, period)), size, period):
            draw.rectangle((0, y, size, y + period // 2 - 1), fill=fill)
    return img


def make_synthetic_dataset(root: Path, train_per_class: int = 40, test_per_class: int = 10, size: int = 64,
                           seed: int = 0) -> Path:
    """Write `root/train/<class>/*.png` and `root/test/<class>/*.png`; the same files for the same arguments."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('test', test_per_class)):
        for name, (shape, color) in SYNTHETIC_CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _draw_synthetic(shape, color, size, rng).save(folder / f'{i:03d}.png')
    return root


def _layout(data: Path) -> Tuple[Path, Optional[Path], Optional[Path]]:
    """(train, val, test) folders as `finetune` finds them (see `data.find_layout`)."""
    layout = find_layout(data)
    return Path(layout.train), Path(layout.val) if layout.val else None, Path(layout.test) if layout.test else None


@dataclass
class DemoResult:
    """Where the demo left everything: `out` holds `run/` (the fine-tuning run) and, without `data`, `data/`."""

    out: Path
    run_dir: Path
    summary: Dict[str, Any]  # the run's summary.json


def demo(out: Optional[Union[str, os.PathLike]] = None, data: Optional[Union[str, os.PathLike]] = None,
         img_size: int = 48, epochs: int = 6, batch_size: int = 16, seed: int = 0) -> DemoResult:
    """`resnetv2-zoo demo` from Python: fine-tune, evaluate and predict end to end, printing as the command does.

    `out` must be new or empty (default: a new temporary folder); `data` is an image folder or dataset root
    (default: a small synthetic 4-class set drawn into `out/data`).
    """
    args = argparse.Namespace(out=os.fspath(out) if out is not None else None,
                              data=os.fspath(data) if data is not None else None, img_size=img_size, epochs=epochs,
                              batch_size=batch_size, seed=seed)
    return run_demo(args)


def run_demo(args: argparse.Namespace) -> DemoResult:
    if args.out:
        check_out(args.out, [args.data])  # a new or empty folder: never mixed into other files
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='resnetv2-zoo-demo-'))
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
    else:
        data = make_synthetic_dataset(out / 'data')
        print(f'synthetic 4-class image set: {data}')
    train, val, test = _layout(data)
    run_dir = out / 'run'
    argv = ['--data', str(train), '--out', str(run_dir), '--img-size', str(args.img_size), '--epochs',
            str(args.epochs), '--batch-size', str(args.batch_size), '--seed', str(args.seed)]
    if val is not None:
        argv += ['--val-data', str(val)]
    summary = run_finetune(finetune_args(argv))

    held_out = test or val
    if held_out is not None:
        print(f'\n== evaluate on {held_out}')
        print(format_report(evaluate_folder(str(run_dir), str(held_out))))
    else:
        print(f'\n(no test/ or val/ folder in {data}: the validation report above is the evaluation)')

    examples = [str(next(p for p in sorted(d.iterdir()) if p.is_file())) for d in sorted((held_out or train).iterdir())
                if d.is_dir()][:4]
    print('\n== predict')
    for prediction in predict_files(str(run_dir), examples, k=2):
        guesses = ', '.join(f'{name} {100 * p:.1f}%' for name, p in prediction.top)
        print(f'{prediction.path}: {guesses}')

    print(f'\nbest validation accuracy {100 * summary["best_val_acc"]:.1f}% (epoch {summary["best_epoch"]}), '
          f'{summary["wall_seconds"]:.0f} s of fine-tuning. Outputs:')
    print('\n'.join(output_lines(run_dir)))
    print(f'\nnext: resnetv2-zoo evaluate {run_dir} --data DIR;  resnetv2-zoo predict {run_dir} IMAGE_OR_DIR')
    return DemoResult(out, run_dir, summary)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('demo', help='fine-tune, evaluate and predict end to end in about three minutes on a CPU',
                            formatter_class=DefaultsHelpFormatter,
                            description='Fine-tune resnet50v2_keras briefly on a synthetic 4-class image set (or on '
                                        '--data), then evaluate and predict, printing where every output is.')
    parser.add_argument('--data', help='real photos: class folders, or train/ [val/] [test/] folders of them')
    parser.add_argument('--out', help='output folder, new or empty (default: a new temporary folder)')
    parser.add_argument('--img-size', type=image_size, default=48, help='training and evaluation image size (px)')
    parser.add_argument('--epochs', type=positive_int, default=6, help='fine-tuning epochs')
    parser.add_argument('--batch-size', type=positive_int, default=16, help='images per step')
    parser.add_argument('--seed', type=non_negative_int, default=0, help='seed of the data, split and training')
    parser.set_defaults(func=run_demo)
