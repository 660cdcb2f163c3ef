"""The figures a fine-tuning run leaves behind, drawn with matplotlib's Agg backend (no display needed)."""
import math
import os
import textwrap
from typing import Any, Dict, List, Sequence, Tuple, Union

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from ..weights.atomic import atomic_file  # noqa: E402
from .data import load_rgb  # noqa: E402

__all__ = ['save_samples_grid', 'save_curves', 'save_confusion', 'save_predictions_grid',
           'save_training_inputs_grid']

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


def _wrapped(name: str, width: int = 22, max_lines: int = 2) -> str:
    """A class name on at most `max_lines` lines of `width` characters (shortened with '...'), so titles never
    run into the next panel."""
    return '\n'.join(textwrap.wrap(name, width, max_lines=max_lines, placeholder='...') or [''])


def save_predictions_grid(paths: Sequence[str], predicted: Sequence[int], targets: Sequence[int],
                          classes: Sequence[str], path: PathLike) -> None:
    """Validation images, each framed green (right) or red (wrong, marked \u2717), titled with the predicted
    class over the true one; a legend says which line is which and what the colours mean."""
    cols = min(4, len(paths))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, image_path, p, t in zip(axes.flat, paths, predicted, targets):
        right = p == t
        color = RIGHT_COLOR if right else WRONG_COLOR
        image = load_rgb(image_path)
        image.thumbnail((256, 256))
        ax.imshow(image)
        ax.axis('on')
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(4)
        title = f'pred: {_wrapped(classes[p])}' + ('' if right else ' \u2717') + f'\ntrue: {_wrapped(classes[t])}'
        ax.set_title(title, fontsize=8, color=color)
    handles = [Patch(facecolor='none', edgecolor=RIGHT_COLOR, linewidth=3, label='predicted = true'),
               Patch(facecolor='none', edgecolor=WRONG_COLOR, linewidth=3, label='predicted \u2260 true (\u2717)')]
    fig.legend(handles=handles, loc='upper center', ncol=2, frameon=False, fontsize=9,
               title='titles: "pred" = model\'s prediction, "true" = label', title_fontsize=9,
               bbox_to_anchor=(0.5, 1.0 + 0.45 / (3.5 * rows)))
    fig.tight_layout(h_pad=2.0)
    _save(fig, path)


def save_curves(history: List[Dict[str, float]], path: PathLike) -> None:
    """Accuracy (in percent, as the CLI prints it) and loss per epoch, train against validation; whole epochs."""
    epochs = [row['epoch'] for row in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((acc_ax, 'acc', 'accuracy'), (loss_ax, 'loss', 'loss')):
        scale = 100.0 if metric == 'acc' else 1.0
        ax.plot(epochs, [scale * row[f'train_{metric}'] for row in history], 'o-', label=f'train {label}')
        ax.plot(epochs, [scale * row[f'val_{metric}'] for row in history], 'o-', label=f'validation {label}')
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label + (' (%)' if metric == 'acc' else ''))
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
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


def save_training_inputs_grid(samples: Sequence[Tuple[str, int]], transform: Any, classes: Sequence[str],
                              mean: Sequence[float], std: Sequence[float], path: PathLike,
                              augmented: bool = True) -> None:
    """Training images, each original beside what the model is fed: `transform`'s output (one random draw of the
    augmentation, at the training resolution), un-normalized with `mean`/`std` for display."""
    pairs = 2 if len(samples) > 1 else 1
    rows = math.ceil(len(samples) / pairs)
    fig, axes = plt.subplots(rows, 2 * pairs, figsize=(2.4 * 2 * pairs, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    kind = 'augmented' if augmented else 'resized'
    for i, (image_path, target) in enumerate(samples):
        original_ax, input_ax = axes.flat[2 * i], axes.flat[2 * i + 1]
        image = load_rgb(image_path)
        tensor = transform(image)
        shown = (tensor * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()
        original_ax.imshow(image)
        original_ax.set_title(f'{_wrapped(classes[target], 18, 1)}\noriginal {image.width}\u00d7{image.height}',
                              fontsize=8)
        input_ax.imshow(shown)
        input_ax.set_title(f'model input\n{kind} {shown.shape[1]}\u00d7{shown.shape[0]}', fontsize=8,
                           color='tab:blue')
        for spine in input_ax.spines.values():
            spine.set_edgecolor('tab:blue')
            spine.set_linewidth(2)
        input_ax.axis('on')
        input_ax.set_xticks([])
        input_ax.set_yticks([])
    fig.suptitle('training samples: each photo, then what the model trains on (one random draw)' if augmented else
                 'training samples: each photo, then what the model trains on (no augmentation)', fontsize=10)
    fig.tight_layout()
    _save(fig, path)
