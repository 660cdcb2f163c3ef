"""The private timm API this package uses, in one place, each with a fallback of our own.

timm keeps `feature_take_indices` (`timm.models._features`) and `save_config_for_hf` (`timm.models._hub`)
out of its public namespace, so a release may move or change them: `save_config_for_hf` gained a
`data_config` argument in 1.0.31 and began to resolve the data config and record the model arguments
itself. pyproject pins timm to the tested range; within it, these wrappers call timm's own function when
it is importable and takes the arguments we pass (checked with `inspect.signature`), and otherwise use the
fallback below.
"""
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

try:
    from timm.models._features import feature_take_indices as _timm_feature_take_indices
except ImportError:  # moved or removed in a later timm
    _timm_feature_take_indices = None

try:
    from timm.models._hub import save_config_for_hf as _timm_save_config_for_hf
except ImportError:
    _timm_save_config_for_hf = None

__all__ = ['feature_take_indices', 'save_config_for_hf']

# pretrained_cfg keys that name where weights came from: not part of an exported model's config (as in timm)
_SOURCE_KEYS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'source', 'state_dict')
_KEEP_NULL_KEYS = ('pool_size', 'first_conv', 'classifier')


def feature_take_indices(num_features: int, indices: Optional[Union[int, List[int]]] = None) -> Tuple[List[int], int]:
    """Absolute indices of the features to take (None: all, int n: the last n, list: those, negative from
    the end) and the largest of them, as timm's `forward_intermediates` implementations use them.

    TorchScript (`torch.jit.script` of a `features_only` model) compiles the fallback: a module global that
    may be None is not something it can call."""
    if not torch.jit.is_scripting():  # noqa: SIM102  (nested: TorchScript skips only this whole branch)
        if _timm_feature_take_indices is not None:
            return _timm_feature_take_indices(num_features, indices)
    return _feature_take_indices(num_features, indices)


def _feature_take_indices(num_features: int, indices: Optional[Union[int, List[int]]] = None) -> Tuple[List[int], int]:
    """The fallback: timm 1.0's semantics and messages."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise AssertionError(f'last-n ({indices}) is out of range (1 to {num_features})')
        take_indices = [num_features - indices + i for i in range(indices)]
    else:
        take_indices: List[int] = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise AssertionError(f'feature index {idx} is out of range (0 to {num_features - 1})')
            take_indices.append(idx)
    return take_indices, max(take_indices)


def save_config_for_hf(model: torch.nn.Module, config_path: Union[str, Path],
                       model_config: Optional[Dict[str, Any]] = None) -> None:
    """Write the `config.json` of timm's `save_for_hf` layout for `model`, with `model_config` (label names)
    added; the caller's dict is never modified (timm < 1.0.31 pops from it)."""
    model_config = dict(model_config or {})
    timm_fn = _timm_save_config_for_hf
    if timm_fn is not None and _accepts(timm_fn, ('model_config',)):
        timm_fn(model, Path(config_path), model_config=model_config)
    else:
        _save_config(model, Path(config_path), model_config)


def _accepts(fn: Callable, keywords: Tuple[str, ...]) -> bool:
    """Whether `fn(model, path, **{keyword: ...})` fits its signature."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in parameters.values()]
    positional = sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)
    if positional < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds:
        return False
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return True
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(k in parameters and parameters[k].kind in by_name for k in keywords)


def _save_config(model: torch.nn.Module, config_path: Path, model_config: Dict[str, Any]) -> None:
    """The fallback: the config timm 1.0.20-1.0.30 wrote, which `timm.create_model('local-dir:...')` reads,
    plus the model arguments that rebuild the model as it is now (`in_chans`, the current pooling)."""
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items()
                      if k not in _SOURCE_KEYS and (v is not None or k in _KEEP_NULL_KEYS)}
    hf_config: Dict[str, Any] = {
        'architecture': pretrained_cfg.pop('architecture'),
        'num_classes': model_config.pop('num_classes', model.num_classes),
        'num_features': model_config.pop('num_features', model.num_features),
    }
    global_pool = model_config.pop('global_pool', _global_pool(model))
    if isinstance(global_pool, str) and global_pool:
        hf_config['global_pool'] = global_pool
    # what timm >= 1.0.31 records so that the model is rebuilt as it is now (the top-level keys are informational)
    model_args = {k: v for k, v in getattr(model, '_model_args', {}).items() if not k.endswith('drop_rate')}
    model_args.update({'in_chans': getattr(model, 'in_chans', None), 'global_pool': global_pool,
                       'num_classes': model.num_classes})
    model_args = {k: v for k, v in model_args.items() if v is not None}
    if model_args:
        hf_config['model_args'] = model_args
    for key in ('label_names', 'label_descriptions'):
        if model_config.get(key):
            hf_config[key] = model_config.pop(key)
    hf_config['pretrained_cfg'] = pretrained_cfg
    hf_config.update(model_config)
    with config_path.open('w') as f:
        json.dump(hf_config, f, indent=2)


def _global_pool(model: torch.nn.Module) -> Optional[str]:
    """The current pooling type, from the module that pools (as timm 1.0.31 reads it)."""
    head = getattr(model, 'head', None)
    for pool in (getattr(head, 'global_pool', None), getattr(head, 'pool_type', None),
                 getattr(model, 'global_pool', None)):
        pool = getattr(pool, 'pool_type', pool)
        if isinstance(pool, str):
            return pool
    return None
