"""Logits to the k most likely labels: the one decoding behind `decode_predictions` and `resnetv2-zoo predict`."""
from typing import List, Sequence, Tuple, TypeVar

import torch

__all__ = ['probabilities', 'top_k_labels']

Label = TypeVar('Label')


def probabilities(logits: torch.Tensor, activation: str = 'softmax') -> torch.Tensor:
    """Class probabilities, in float32: sigmoid per class for a model whose Keras original ended in a sigmoid
    (each class on its own), else softmax (a softmax top, or a linear one trained on logits)."""
    logits = logits.detach().float()
    return logits.sigmoid() if activation == 'sigmoid' else logits.softmax(dim=1)


def top_k_labels(logits: torch.Tensor, labels: Sequence[Label], k: int,
                 activation: str = 'softmax') -> List[List[Tuple[Label, float]]]:
    """Per row of `logits` (batch, classes): (label, probability) for the k best classes, best first.

    `k` above the class count is clipped to it. Probabilities are computed in float32, whatever the
    logits' dtype, so a bf16/fp16 model gives the same ranking as a float32 one would on equal logits.
    """
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f'expected logits of shape (batch, {len(labels)}), got {tuple(logits.shape)}')
    if k < 1:
        raise ValueError(f'k must be positive, got {k}')
    probs, indices = probabilities(logits, activation).topk(min(k, logits.shape[1]), dim=1)
    return [[(labels[i], p) for p, i in zip(row_p, row_i)] for row_p, row_i in zip(probs.tolist(), indices.tolist())]
