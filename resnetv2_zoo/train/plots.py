"""The figures a fine-tuning run leaves behind, drawn with matplotlib's Agg backend (no display needed)."""
import math
import os
from typing import Dict, List, Sequence, Tuple, Union

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..weights.atomic import atomic_file  # noqa: E402
from .data import load_rgb  # noqa: E402

__all__ = ['save_samples_grid', 'save_curves', 'save_confusion', 'save_predictions_grid']

PathLike = Union[str, os.PathLike]
WRONG_COLOR = 'tab:red'
RIGHT_COLOR = 'tab:green'


def _save(fig: plt.Figure, path: PathLike) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight')
    plt.close(fig)


def _image_grid(paths: Sequence[str], titles: Sequence[str], colors: Sequence[str], path: PathLike) -> None:
    cols = min(4, len(paths))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, image_path, title, color in zip(axes.flat, paths, titles, colors):
        image = load_rgb(image_path)
        image.thumbnail((256, 256))
        ax.imshow(image)
        ax.set_title(title, fontsize=9, color=color)
    _save(fig, path)


def save_samples_grid(samples: Sequence[Tuple[str, int]], classes: Sequence[str], path: PathLike) -> None:
    """Training images with their class names, as the tutorial shows them before training."""
    _image_grid([p for p, _ in samples], [classes[t] for _, t in samples], ['black'] * len(samples), path)


def save_predictions_grid(paths: Sequence[str], predicted: Sequence[int], targets: Sequence[int],
                          classes: Sequence[str], path: PathLike) -> None:
    """Validation images titled 'predicted / true'; wrong ones in red and marked."""
    titles = [f'{classes[p]} / {classes[t]}' + ('' if p == t else '  \u2717') for p, t in zip(predicted, targets)]
    colors = [RIGHT_COLOR if p == t else WRONG_COLOR for p, t in zip(predicted, targets)]
    _image_grid(paths, titles, colors, path)


def save_curves(history: List[Dict[str, float]], path: PathLike) -> None:
    """Accuracy and loss per epoch, train against validation."""
    epochs = [row['epoch'] for row in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((acc_ax, 'acc', 'accuracy'), (loss_ax, 'loss', 'loss')):
        ax.plot(epochs, [row[f'train_{metric}'] for row in history], 'o-', label=f'train {label}')
        ax.plot(epochs, [row[f'val_{metric}'] for row in history], 'o-', label=f'validation {label}')
        ax.set_xlabel('epoch')
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def save_confusion(matrix: torch.Tensor, classes: Sequence[str], path: PathLike) -> None:
    """Row-normalized confusion matrix (each true class sums to 1), with raw counts in the cells."""
    counts = matrix.numpy()
    normalized = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(normalized, cmap='Blues', vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha='right')
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    for (i, j), value in np.ndenumerate(normalized):
        ax.text(j, i, f'{value:.2f}\n({counts[i, j]})', ha='center', va='center', fontsize=8,
                color='white' if value > 0.5 else 'black')
    _save(fig, path)
