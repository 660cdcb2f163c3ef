"""The classifier head of a Keras ResNet model as people build it: global pooling, then one or more `Dense` layers.

`keras.applications` ends in pooling + one `Dense` (timm's `ClassifierHead`), but fine-tuned Keras models
often put hidden layers in between (`GlobalAveragePooling2D -> Dense(32, 'relu') -> Dropout -> Dense(4)`).
`KerasMlpHead` computes the same logits: pool -> [Linear -> activation] per hidden layer -> dropout -> fc.
As with timm's `NormMlpClassifierHead`, the hidden layers are the pre-logits: `reset` replaces only `fc`,
and `forward(pre_logits=True)` returns the last hidden layer's output.

A Keras `Dropout` layer is the identity at inference, so where it sat does not change the logits; in
training the one dropout here acts before `fc`, as timm's heads do.
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, SelectAdaptivePool2d

__all__ = ['HIDDEN_ACTIVATIONS', 'KerasMlpHead', 'create_keras_head']

# Keras activation name -> the module that computes it exactly (Keras `linear` is the identity)
HIDDEN_ACTIVATIONS = {
    'linear': nn.Identity,
    'relu': nn.ReLU,
    'sigmoid': nn.Sigmoid,
    'tanh': nn.Tanh,
    'softmax': lambda: nn.Softmax(dim=1),
}


class KerasMlpHead(nn.Module):
    """Global pooling, hidden `Linear` + activation layers, dropout and the classifier `fc`."""

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            hidden_sizes: Sequence[int],
            hidden_acts: Sequence[str],
            pool_type: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        if not pool_type:
            raise ValueError('A head with hidden layers needs global pooling (a Keras Dense on a feature map is '
                             'applied per position, which this head does not do).')
        if len(hidden_acts) != len(hidden_sizes):
            raise ValueError(f'head_act needs one activation per hidden layer ({len(hidden_sizes)}), '
                             f'got {list(hidden_acts)}.')
        unknown = [a for a in hidden_acts if a not in HIDDEN_ACTIVATIONS]
        if unknown:
            raise ValueError(f'Unsupported head activation {unknown[0]!r}; expected one of '
                             f'{tuple(HIDDEN_ACTIVATIONS)}.')
        self.in_features = in_features
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        layers = []
        width = self.global_pool.feat_mult() * in_features
        for size, act in zip(hidden_sizes, hidden_acts):
            layers += [nn.Linear(width, size), HIDDEN_ACTIVATIONS[act]()]
            width = size
        self.hidden = nn.Sequential(*layers)
        self.num_features = width
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type == '' and num_classes == 0:  # `prune_intermediate_layers`, `reset_classifier(0, '')`: no head
            self.global_pool = SelectAdaptivePool2d(pool_type='', flatten=False)
            self.hidden = nn.Sequential()
            self.num_features = self.in_features
        elif pool_type is not None and pool_type != self.global_pool.pool_type:
            pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
            if not pool_type or pool.feat_mult() != self.global_pool.feat_mult():
                raise ValueError(f'Pooling {pool_type!r} does not fit the hidden layers of this head.')
            self.global_pool = pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.hidden(self.global_pool(x)))
        return x if pre_logits else self.fc(x)


def create_keras_head(
        in_features: int,
        num_classes: int,
        pool_type: str = 'avg',
        drop_rate: float = 0.,
        head_hidden: Sequence[int] = (),
        head_act: Union[str, Sequence[str]] = 'relu',
) -> nn.Module:
    """timm's `ClassifierHead` without hidden layers (the keras.applications top), else a `KerasMlpHead`.

    `head_act` is one activation for every hidden layer, or one per layer.
    """
    if not head_hidden:
        return ClassifierHead(in_features, num_classes, pool_type=pool_type, drop_rate=drop_rate)
    acts = [head_act] * len(head_hidden) if isinstance(head_act, str) else list(head_act)
    return KerasMlpHead(in_features, num_classes, list(head_hidden), acts, pool_type=pool_type, drop_rate=drop_rate)
