"""Model directories in timm's `save_for_hf` layout (`config.json` + `model.safetensors`), and loading them.

One writer serves the converter, the pretrained cache and fine-tuning, so every checkpoint this
package makes loads the same three ways: `timm.create_model('local-dir:DIR')`, timm's
`pretrained_cfg_overlay=dict(file=DIR/model.safetensors)`, and `load_model(DIR)`. The weights file
also carries architecture, class count and label names in its safetensors metadata, so it can be
loaded on its own. Nothing here unpickles.

Writers replace only what this package wrote (`check_own_dir`, `check_own_file`), and loading is
strict (`inspect_checkpoint`): a config.json that disagrees with its weights file (architecture, class
count, tensors) is refused naming both values, so a head is never left at random initialisation.

Every model directory also gets a `README.md` model card in the Hugging Face Hub's layout (`model_card`):
what the folder holds, how to load it, that timm needs `import resnetv2_zoo` first, and where the weights
came from (the Keras file, its SHA-256 and parity, or the fine-tune data and metrics). The card ends with
a checksum line: a card that still matches it is ours and is regenerated on each save; a README.md
someone wrote or edited is theirs and is kept as it is.
"""
import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import timm
import torch

from .._timm_compat import save_config_for_hf
from ..errors import ResNetV2ZooError
from .atomic import atomic_dir, atomic_file

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
README_NAME = 'README.md'  # the model card (the Hub's layout): ours is regenerated, anyone else's is kept
MODEL_DIR_NAMES = frozenset({CONFIG_NAME, WEIGHTS_NAME, README_NAME})
CARD_TAGS = ('image-classification', 'timm', 'keras', 'resnetv2-zoo')
DEFAULT_LICENSE = 'apache-2.0'  # Keras Applications' weights and code
CARD_CHECKSUM_PREFIX = '<!-- resnetv2-zoo model card, sha256 '
CARD_CHECKSUM_SUFFIX = ' (regenerated on each save while unedited) -->'
PathLike = Union[str, os.PathLike]
MAX_LISTED = 6  # names listed per kind in an error message


def check_writable_parent(out: Path) -> None:
    """Fail before any work when `out` cannot be created: its parent is missing or is not a directory."""
    if not out.parent.exists():
        raise ResNetV2ZooError(f'cannot write {out}: directory {out.parent} does not exist')
    if not out.parent.is_dir():
        raise ResNetV2ZooError(f'cannot write {out}: {out.parent} is not a directory')


def is_own_weights_file(path: PathLike) -> bool:
    """A safetensors file this package wrote: `weights_metadata` records the architecture and class count in it,
    which timm's own `save_for_hf` (and every other writer) does not."""
    try:
        metadata = read_weights_metadata(path)
    except Exception:  # not safetensors (safetensors raises its own error types), unreadable
        return False
    return 'architecture' in metadata and 'num_classes' in metadata


def _listing(names: Sequence[str]) -> str:
    shown = ', '.join(str(n) for n in names[:MAX_LISTED])
    return shown + (f' ... and {len(names) - MAX_LISTED} more' if len(names) > MAX_LISTED else '')


def check_own_file(path: Path) -> None:
    """Refuse to replace `path` unless it is a `.safetensors` file this package wrote."""
    if path.is_symlink():
        raise ResNetV2ZooError(f'refusing to replace {path}: it is a symbolic link, not a file resnetv2-zoo wrote')
    if path.is_file() and path.suffix == '.safetensors' and is_own_weights_file(path):
        return
    kind = 'a directory' if path.is_dir() else 'a file resnetv2-zoo did not write' if path.is_file() else 'not a file'
    raise ResNetV2ZooError(f'refusing to replace {path}: it is {kind}; choose another output or remove it yourself')


def check_own_dir(path: Path) -> None:
    """Refuse to replace `path` unless it is an empty directory or a model directory this package wrote:
    only config.json + model.safetensors (+ README.md), the weights carrying our metadata."""
    if path.is_symlink() or not path.is_dir():
        kind = 'a symbolic link' if path.is_symlink() else 'a file'
        raise ResNetV2ZooError(f'refusing to replace {path}: it is {kind}, not a model directory resnetv2-zoo wrote')
    names = sorted(os.listdir(path))
    if not names:
        return
    others = [n for n in names if n not in MODEL_DIR_NAMES]
    files_ok = all((path / n).is_file() and not (path / n).is_symlink() for n in names if n in MODEL_DIR_NAMES)
    if not others and files_ok and {CONFIG_NAME, WEIGHTS_NAME} <= set(names) and is_own_weights_file(
            path / WEIGHTS_NAME):
        return
    raise ResNetV2ZooError(
        f'refusing to replace {path}: it is not a model directory resnetv2-zoo wrote (it holds {_listing(names)}); '
        f'choose another output or remove it yourself')


OUTPUT_ACTIVATIONS = ('linear', 'softmax', 'sigmoid')
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std')  # what a single weights file records of its pretrained cfg


def output_activation(model: torch.nn.Module) -> str:
    """How the model's logits become probabilities: 'softmax' (one class per image), 'sigmoid' (each class on its own,
    a Keras model ending in Dense(..., 'sigmoid')) or 'linear' (a Keras model trained on logits: softmax applies)."""
    return getattr(model, 'output_activation', 'softmax')


def set_output_activation(model: torch.nn.Module, activation: str) -> None:
    if activation not in OUTPUT_ACTIVATIONS:
        raise ResNetV2ZooError(f'output activation {activation!r} is not one of {", ".join(OUTPUT_ACTIVATIONS)}')
    model.output_activation = activation


def model_args_of(model: torch.nn.Module) -> Dict[str, Any]:
    """The constructor arguments that rebuild `model` (timm records them), the class count aside."""
    return {k: v for k, v in getattr(model, '_model_args', {}).items()
            if k not in ('num_classes', 'pretrained_cfg_overlay') and not k.endswith('drop_rate')}


def weights_metadata(model: torch.nn.Module, label_names: Optional[Sequence[str]] = None,
                     extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """safetensors metadata (string to string) that makes the file self-describing."""
    metadata = {
        'format': 'pt',
        'architecture': model.pretrained_cfg['architecture'],
        'num_classes': str(model.num_classes),
        'data_config': json.dumps({k: model.pretrained_cfg[k] for k in DATA_CONFIG_KEYS if k in model.pretrained_cfg}),
    }
    if model_args_of(model):
        metadata['model_args'] = json.dumps(model_args_of(model))
    if output_activation(model) != 'softmax':
        metadata['output_activation'] = output_activation(model)
    if label_names:
        metadata['label_names'] = json.dumps(list(label_names))
    metadata.update(extra or {})
    return metadata


Check = Callable[[Path], None]  # called with the complete temporary output before it replaces anything


def save_weights_file(model: torch.nn.Module, path: PathLike, label_names: Optional[Sequence[str]] = None,
                      metadata: Optional[Dict[str, str]] = None, check: Optional[Check] = None,
                      replaceable: Optional[Check] = check_own_file) -> Path:
    """Write the model's state dict to one self-describing `.safetensors` file, atomically.

    An existing `path` is replaced only if `replaceable(path)` allows it (by default: a file this
    package wrote), checked before any work and again just before the rename. `check` may refuse the
    written temporary, in which case nothing is replaced.
    """
    path = Path(path)
    if replaceable is not None and os.path.lexists(path):
        replaceable(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path, replaceable) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=weights_metadata(model, label_names, metadata))
        except safetensors.SafetensorError as e:  # how it reports a failed write (disk full): not an OSError
            raise OSError(str(e)) from e
        if check is not None:
            check(tmp)
    return path


def save_model_dir(model: torch.nn.Module, out_dir: PathLike, label_names: Optional[Sequence[str]] = None,
                   metadata: Optional[Dict[str, str]] = None, check: Optional[Check] = None,
                   replaceable: Optional[Check] = check_own_dir) -> Path:
    """Write `out_dir` in timm's `save_for_hf` layout with a model card, replacing any previous one whole.

    An existing `out_dir` is replaced only if `replaceable(out_dir)` allows it (by default: an empty
    directory or a model directory this package wrote), checked before any work and again just before
    the swap. The card (`model_card`) describes `metadata`; a README.md that is not a card this package
    wrote (someone's own, or ours edited) is carried over instead. `check` may refuse the written temporary
    directory, in which case nothing is replaced.
    """
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    if replaceable is not None and os.path.lexists(out_dir):
        replaceable(out_dir)
    model_config: Dict[str, Any] = {}
    if output_activation(model) != 'softmax':
        model_config['output_activation'] = output_activation(model)
    if metadata and metadata.get('keras_conversion'):  # what the converter read and assumed (`convert_keras`)
        model_config['keras_conversion'] = json.loads(metadata['keras_conversion'])
    if label_names:
        if len(label_names) != model.num_classes:
            raise ResNetV2ZooError(
                f'{len(label_names)} label names given for a model with {model.num_classes} classes')
        model_config['label_names'] = list(label_names)
    with atomic_dir(out_dir, replaceable) as tmp:
        save_weights_file(model, tmp / WEIGHTS_NAME, label_names, metadata)
        save_config_for_hf(model, tmp / CONFIG_NAME, model_config=model_config)
        readme = out_dir / README_NAME
        if readme.is_file() and not readme.is_symlink() and not is_own_model_card(readme):
            shutil.copy2(readme, tmp / README_NAME)
            _logger.info('kept %s: written or edited by someone else, so the generated model card does not replace '
                         'it', readme)
        else:
            card = model_card(model.pretrained_cfg['architecture'], model.num_classes, label_names,
                              weights_metadata(model, label_names, metadata), model.pretrained_cfg, out_dir.name)
            (tmp / README_NAME).write_text(card, encoding='utf8')
        if check is not None:
            check(tmp)
    return out_dir


def read_weights_metadata(path: PathLike) -> Dict[str, str]:
    with safetensors.safe_open(str(path), framework='pt') as f:
        return f.metadata() or {}


@dataclass
class CheckpointInfo:
    """What a checkpoint says it holds, once config.json, the safetensors metadata and the tensors agree."""

    weights: Path
    architecture: str
    num_classes: int
    model_args: Dict[str, Any]
    label_names: Optional[Tuple[str, ...]]
    output_activation: str = 'softmax'
    data_config: Optional[Dict[str, Any]] = None  # mean/std/input_size of a single weights file
    tensor_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # of every tensor in the weights file


def load_model(path: PathLike, **kwargs: Any) -> torch.nn.Module:
    """Build the model a checkpoint directory or a self-describing `.safetensors` file describes.

    `kwargs` go to `timm.create_model` (for example `num_classes` to re-head, `features_only`).
    Only safetensors is read, so a checkpoint cannot run code; a pickle under any name is refused.
    The checkpoint is cross-checked first (`inspect_checkpoint`), and the loaded classifier is
    compared with the file's, so a model never comes back with a randomly initialised head unless
    `num_classes` asked for a new one.
    """
    path = Path(path)
    info = inspect_checkpoint(path)
    if path.is_dir():
        model = _create(path, f'local-dir:{path}', kwargs, info)
    else:
        overlay: Dict[str, Any] = dict(file=str(path), num_classes=info.num_classes, **(info.data_config or {}))
        if info.label_names is not None:
            overlay['label_names'] = info.label_names
        kwargs.setdefault('num_classes', info.num_classes)
        kwargs = dict(info.model_args, **kwargs, pretrained_cfg_overlay=overlay)
        model = _create(path, info.architecture, kwargs, info)
    _check_head_loaded(path, model, info)
    if getattr(model, 'num_classes', None) == info.num_classes:  # a new head (`num_classes=`) is trained anew
        set_output_activation(model, info.output_activation)
    return model


def inspect_checkpoint(path: PathLike) -> CheckpointInfo:
    """Read what a model directory or `.safetensors` file says it holds, and refuse any disagreement.

    A directory's config.json must agree with itself (`num_classes` and `model_args.num_classes`),
    with the metadata in its weights file (architecture, class count) and with the tensors: the class
    count is the classifier's rows, and every tensor of the model config.json describes must be there
    with its shape, and no other. timm would otherwise load such a file with a new random head (when
    only `model_args` disagree) or fail with a long state-dict error. Nothing is unpickled.
    """
    path = Path(path)
    if path.is_dir():
        config_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise ResNetV2ZooError(f'{path} is not a model directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}')
        metadata = _safetensors_metadata(weights)
        config = _read_config(config_path)
        where = str(config_path)
        architecture = config.get('architecture')
        if not isinstance(architecture, str):
            raise ResNetV2ZooError(f'{where} has no architecture (found {architecture!r})')
        num_classes = _class_count(config.get('num_classes'), f'{where} num_classes')
        model_args = config.get('model_args', {})
        if not isinstance(model_args, dict):
            raise ResNetV2ZooError(f'{where} model_args is {type(model_args).__name__}, expected an object')
        if 'num_classes' in model_args and model_args['num_classes'] != num_classes:
            raise ResNetV2ZooError(f'{where} says num_classes {num_classes} but model_args.num_classes '
                                   f'{model_args["num_classes"]!r}')
        if 'architecture' in metadata and metadata['architecture'] != architecture:
            raise ResNetV2ZooError(f'{where} says architecture {architecture} but {weights} metadata says '
                                   f'{metadata["architecture"]}')
        if 'num_classes' in metadata and metadata['num_classes'] != str(num_classes):
            raise ResNetV2ZooError(f'{where} says num_classes {num_classes} but {weights} metadata says '
                                   f'{metadata["num_classes"]}')
        label_names = config.get('label_names')
        activation = config.get('output_activation', metadata.get('output_activation', 'softmax'))
        data_config = None
    else:
        if not path.is_file():
            raise ResNetV2ZooError(f'no checkpoint at {path}')
        weights = path
        metadata = _safetensors_metadata(path)
        model_args = _metadata_json(metadata, 'model_args', path, dict) or {}
        data_config = _metadata_json(metadata, 'data_config', path, dict)
        if data_config is not None:
            data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
                           if k in DATA_CONFIG_KEYS}
        activation = metadata.get('output_activation', 'softmax')
        if 'architecture' not in metadata:
            raise ResNetV2ZooError(f'{path} has no architecture in its metadata; load it with timm.create_model('
                                   f'arch, pretrained=True, pretrained_cfg_overlay=dict(file=...))')
        where, architecture = f'{path} metadata', metadata['architecture']
        num_classes = _class_count(metadata.get('num_classes'), f'{where} num_classes')
        label_names = metadata.get('label_names')
        if label_names is not None:
            try:
                label_names = json.loads(label_names)
            except ValueError as e:
                raise ResNetV2ZooError(f'{where} label_names is not JSON ({e})') from e
    if label_names is not None:
        if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
            raise ResNetV2ZooError(f'{where} label_names is not a list of strings')
        if len(label_names) != num_classes:
            raise ResNetV2ZooError(f'{where} has {len(label_names)} label names but num_classes {num_classes}')
        label_names = tuple(label_names)
    if activation not in OUTPUT_ACTIVATIONS:
        raise ResNetV2ZooError(f'{where} output_activation is {activation!r}, expected one of '
                               f'{", ".join(OUTPUT_ACTIVATIONS)}')
    shapes = _check_tensors(weights, where, architecture, num_classes, model_args)
    return CheckpointInfo(weights, architecture, num_classes, model_args, label_names, activation, data_config,
                          shapes)


def _metadata_json(metadata: Dict[str, str], key: str, path: Path, kind: type) -> Any:
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except ValueError as e:
        raise ResNetV2ZooError(f'{path} metadata {key} is not JSON ({e})') from e
    if not isinstance(value, kind):
        raise ResNetV2ZooError(f'{path} metadata {key} is a {type(value).__name__}, expected a {kind.__name__}')
    return value


def _read_config(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding='utf8'))
    except (OSError, ValueError, RecursionError) as e:
        raise ResNetV2ZooError(f'{path} is not readable JSON ({type(e).__name__}: {e})') from e
    if not isinstance(config, dict):
        raise ResNetV2ZooError(f'{path} holds a JSON {type(config).__name__}, expected an object')
    return config


def _class_count(value: Any, what: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ResNetV2ZooError(f'{what} is {value!r}, expected a count >= 0')
    return value


@functools.lru_cache(maxsize=16)
def _model_shapes(architecture: str, num_classes: int, model_args_json: str) -> Tuple[str, Dict[str, Tuple[int, ...]]]:
    """Classifier name and tensor shapes of the model a checkpoint describes; built on the meta device (no memory),
    or for real where a model's constructor needs real tensors."""
    kwargs = {**json.loads(model_args_json), 'num_classes': num_classes}
    try:
        with torch.device('meta'):
            model = timm.create_model(architecture, **kwargs)
    except Exception:  # retried for real below, which raises a genuine failure
        model = timm.create_model(architecture, **kwargs)
    classifier = model.pretrained_cfg.get('classifier') or 'head.fc'
    return classifier, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_tensors(weights: Path, where: str, architecture: str, num_classes: int,
                   model_args: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Class count first (the classifier's rows), then every tensor name and shape against the described model;
    the file's tensor shapes."""
    if not timm.is_model(architecture):
        raise ResNetV2ZooError(f'{where} names architecture {architecture!r}, which is not a timm model')
    try:
        classifier, expected = _model_shapes(architecture, num_classes, json.dumps(model_args, sort_keys=True))
    except Exception as e:  # any failure to build it (bad model_args) is the checkpoint's fault
        raise ResNetV2ZooError(f'{where} describes a model timm cannot build ({type(e).__name__}: {e})') from e
    try:
        with safetensors.safe_open(str(weights), framework='pt') as f:
            names = f.keys()
            found = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ResNetV2ZooError(f'{weights} is not a safetensors file ({type(e).__name__}: {e})') from e
    head = found.get(f'{classifier}.weight')
    found_classes = head[0] if head else 0
    if found_classes != num_classes:
        holds = f'a {found_classes}-class head ({classifier}.weight {list(head)})' if head else 'no classifier'
        raise ResNetV2ZooError(f'{where} says num_classes {num_classes} but {weights} holds {holds}')
    # BatchNorm step counters are optional: torch fills them in when a state dict has none.
    missing = [k for k in expected if k not in found and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f'{k}: expected {list(expected[k])}, found {list(found[k])}'
                  for k in found if k in expected and found[k] != expected[k]]
    if missing or unexpected or mismatched:
        kinds = ('missing tensors', missing), ('unexpected tensors', unexpected), ('shape mismatches', mismatched)
        problems = [f'{kind}: {_listing(items)}' for kind, items in kinds if items]
        raise ResNetV2ZooError(f'{weights} does not match {architecture} with {num_classes} classes as {where} '
                               f'says: ' + '; '.join(problems))
    return found


def _check_head_loaded(path: Path, model: torch.nn.Module, info: CheckpointInfo) -> None:
    """After timm loaded it: the classifier must be the file's, unless a new class count was asked for."""
    if not info.num_classes or getattr(model, 'num_classes', None) != info.num_classes:
        return
    classifier = model.pretrained_cfg.get('classifier') or 'head.fc'
    state = model.state_dict()
    with safetensors.safe_open(str(info.weights), framework='pt') as f:
        stored_names = set(f.keys())
        for key in (f'{classifier}.weight', f'{classifier}.bias'):
            if key in state and key in stored_names:
                loaded, stored = state[key].detach().cpu(), f.get_tensor(key)
                # Bit-identical, as NaN (accepted with allow_nonfinite) differs from itself under torch.equal.
                same = loaded.shape == stored.shape and torch.equal(
                    loaded.contiguous().reshape(-1).view(torch.uint8),
                    stored.to(loaded.dtype).contiguous().reshape(-1).view(torch.uint8))
                if not same:
                    raise ResNetV2ZooError(f'{path} loaded with {key} not equal to the one in {info.weights}: the '
                                           f'head would be left at random initialisation')


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    """The header of a safetensors file: parsed as JSON, never unpickled, so a pickle fails here."""
    try:
        return read_weights_metadata(path)
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ResNetV2ZooError(f'{path} is not a safetensors file ({type(e).__name__}: {e})') from e


def _create(path: Path, name: str, kwargs: Dict[str, Any], info: CheckpointInfo) -> torch.nn.Module:
    """timm.create_model, with a damaged checkpoint (truncated data, tensors of another model) named as such.

    Where the file holds every tensor of the requested model, as it is (the usual case: no new head, no other
    `in_chans`, no feature wrapper), the model is built without random initialisation (as `create_loaded`
    explains) and the file copied in; otherwise timm's pretrained loading adapts it. (Copied, not assigned:
    safetensors maps the file, and tensors kept on that mapping would fault if the file were rewritten in place.)
    """
    try:
        model = _on_meta(name, kwargs)  # the architecture and pretrained_cfg timm resolves, without weights
        if _filled_by(model, info.tensor_shapes):
            model.to_empty(device='cpu')
            model.load_state_dict(safetensors.torch.load_file(str(info.weights)), strict=True)
            return model
        return timm.create_model(name, pretrained=True, **kwargs)
    except (safetensors.SafetensorError, RuntimeError, KeyError, ValueError) as e:
        raise ResNetV2ZooError(f'{path} does not load as a {name} checkpoint ({type(e).__name__}: {e})') from e


def create_loaded(name: str, state_dict: Dict[str, torch.Tensor], **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model(name, **kwargs)` holding `state_dict` (loaded strictly).

    Drawing a ResNet's weights at random is most of the time of building it (ResNet50V2 on one core: 0.09 of
    0.11 s), and loading replaces all of it. So where `state_dict` holds every tensor of the model with
    its shape, the model is built on the meta device and given uninitialised memory (`to_empty`) that the strict
    load then fills completely; the tensors are copied, so the model never shares memory with `state_dict`.
    Otherwise it is built as usual, and `load_state_dict` names what is missing or mismatched.
    """
    model = _on_meta(name, kwargs)
    if _filled_by(model, {k: tuple(v.shape) for k, v in state_dict.items()}):
        model.to_empty(device='cpu')
    else:
        model = timm.create_model(name, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model


def _on_meta(name: str, kwargs: Dict[str, Any]) -> Optional[torch.nn.Module]:
    """The model built on the meta device, or None where its constructor needs real tensors (it is then built and
    loaded the usual way, which raises any genuine failure)."""
    try:
        with torch.device('meta'):
            return timm.create_model(name, **kwargs)
    except Exception:
        return None


def _filled_by(model: Optional[torch.nn.Module], shapes: Dict[str, Tuple[int, ...]]) -> bool:
    """Whether a strict load of tensors of these `shapes` sets every tensor of the meta-device `model`: the same
    names and shapes as its state dict, and no tensor outside it (a non-persistent buffer)."""
    if model is None:
        return False
    state = model.state_dict()
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return names <= state.keys() and {k: tuple(v.shape) for k, v in state.items()} == shapes


# --- the model card ----------------------------------------------------------------------------------------
def _yaml_str(value: str) -> str:
    """A YAML scalar: JSON's double-quoted string is valid YAML."""
    return json.dumps(str(value), ensure_ascii=False)


def _percent(value: Optional[str]) -> str:
    try:
        return f'{100 * float(value):.1f}%'
    except (TypeError, ValueError):
        return '?'


def _card_provenance(architecture: str, metadata: Dict[str, str]) -> List[str]:
    """The card's account of where the weights came from: the fine-tune run, or the Keras file."""
    if 'val_acc' in metadata:  # a fine-tuned model (`resnetv2-zoo finetune`, its best epoch)
        data, start = metadata.get('finetune_data'), metadata.get('finetune_weights', '')
        start = ('its pretrained weights' if start == 'pretrained' else
                 'random initialization' if start == 'scratch' else
                 f'the checkpoint `{start[len("init "):]}`' if start.startswith('init ') else
                 start or 'starting weights not recorded')
        counts = [f'{metadata[k]} {what} images' for k, what in (('train_images', 'training'),
                                                                  ('val_images', 'validation')) if metadata.get(k)]
        size = metadata.get('img_size')
        lines = ['## Fine-tuning', '',
                 f'Fine-tuned with `resnetv2-zoo finetune`: {architecture} from {start}'
                 + (f' on the image folder `{data}`' if data else '') + (f': {", ".join(counts)}' if counts else '')
                 + (f', at {size} x {size} pixels' if size else '') + '.', '',
                 '| metric | value |', '| --- | --- |',
                 f'| validation accuracy (best epoch) | {_percent(metadata["val_acc"])} |',
                 f'| best epoch | {metadata.get("epoch", "?")} of {metadata.get("epochs", "?")} |']
        if metadata.get('test_acc'):
            lines.append(f'| test accuracy (`test/`, best epoch) | {_percent(metadata["test_acc"])} on '
                         f'{metadata.get("test_images", "?")} images |')
        return lines
    if 'source_sha256' in metadata:  # converted from a Keras file (`resnetv2-zoo convert`)
        digest = metadata['source_sha256'] or 'not recorded (converted from a live Keras model)'
        lines = ['## Source', '',
                 f'Converted by resnetv2-zoo {metadata.get("converter_version", "")} from the Keras file '
                 f'`{metadata.get("source_file", "?")}` ({metadata.get("source_format", "format not recorded")}, '
                 f'Keras {metadata.get("keras_version", "version not recorded")}), tensor for tensor, without '
                 'approximation.', '',
                 f'- SHA-256 of the source: `{digest}`']
        if metadata.get('keras_conversion'):
            read = json.loads(metadata['keras_conversion'])
            head = ' -> '.join(f'Dense({d["units"]}, {d["activation"]})' for d in read.get('head', [])) or 'none'
            sources = read.get('sources', {})
            lines.append(f'- Model: BatchNorm eps {read.get("bn_eps")} ({sources.get("bn_eps", "?")}), pooling '
                         f'{read.get("pooling") or "none"} ({sources.get("pooling", "?")}), head {head} '
                         f'({sources.get("head", "?")}), preprocessing {read.get("preprocess")} '
                         f'({sources.get("preprocess", "?")}); file: read from the file, option: given to `convert`, '
                         'assumed: keras.applications\' default')
        if metadata.get('verify_max_abs_diff'):
            lines.append(f'- Parity with Keras (`--verify`): max |keras - timm| over the '
                         f'{metadata.get("verify_output", "outputs")} = {float(metadata["verify_max_abs_diff"]):.3g} '
                         f'(tolerance {float(metadata["verify_tolerance"]):.3g})')
        else:
            lines.append('- Parity with Keras: not checked at conversion (`resnetv2-zoo convert --verify` compares '
                         'the outputs with Keras)')
        return lines
    return ['## Source', '', 'Saved by resnetv2-zoo.']


def _is_ours(architecture: str) -> bool:
    """An architecture this package registers (timm alone does not know it)."""
    return architecture.endswith('_keras')


def _input_line(cfg: Dict[str, Any]) -> str:
    input_size, mean, std = cfg.get('input_size'), cfg.get('mean'), cfg.get('std')
    size = f' at {input_size[-2]} x {input_size[-1]} pixels' if input_size else ''
    if mean and std and all(m == 0.5 for m in mean) and all(d == 0.5 for d in std):
        scaling = 'scaled to [-1, 1]'
    elif mean and std:
        scaling = f'normalized with mean {[round(m, 4) for m in mean]} and std {[round(d, 4) for d in std]}'
    else:
        scaling = 'normalized as its timm config says'
    return (f'Input: RGB{size}, {scaling} (`timm.data.resolve_data_config` and `timm.data.create_transform` '
            'build the transform).')


def model_card(architecture: str, num_classes: int, label_names: Optional[Sequence[str]], metadata: Dict[str, str],
               pretrained_cfg: Optional[Dict[str, Any]] = None, dir_name: str = 'MODEL_DIR') -> str:
    """The README.md of a model directory, in the Hub's layout (YAML front matter, then markdown).

    The front matter makes the Hub list it as a timm image classifier; the body says how to load it and,
    plainly, that timm alone does not know the architecture. It ends with `CARD_CHECKSUM_PREFIX` and the
    SHA-256 of everything above, which is how a later save tells its own card from an edited one.
    """
    cfg = dict(pretrained_cfg or {})
    license = cfg.get('license') or DEFAULT_LICENSE
    ours = _is_ours(architecture)
    tags = [tag for tag in CARD_TAGS if ours or tag != 'keras']
    front = ['---', 'library_name: timm', f'license: {_yaml_str(license)}', 'pipeline_tag: image-classification',
             'tags:', *(f'- {_yaml_str(tag)}' for tag in tags), '---', '']
    labels = list(label_names or [])
    shown = ', '.join(f'`{n}`' for n in labels[:20]) + (f' ... ({len(labels)} in all)' if len(labels) > 20 else '')
    classes = (f'{num_classes} classes: {shown}' if labels else
               f'{num_classes} classes' if num_classes else 'no classifier: pooled features')
    what = ("Keras's ResNet as an exact timm model, from" if ours else 'saved by')
    body = [
        f'# {architecture} ({dir_name})', '',
        f'A timm `{architecture}` image classifier ({classes}): {what} '
        f'[resnetv2-zoo](https://pypi.org/project/resnetv2-zoo/). {_input_line(cfg)}', '',
        '## Usage', '',
        '```bash', 'pip install resnetv2-zoo', '```', '',
        '```python',
        'import timm',
        'import resnetv2_zoo  # registers the Keras ResNets with timm: needed before create_model' if ours else
        'import resnetv2_zoo  # not needed by this architecture, which timm knows; harmless',
        '',
        f"model = timm.create_model('local-dir:{dir_name}', pretrained=True).eval()  # this folder's path",
        "# or, once this folder is uploaded to the Hub: timm.create_model('hf-hub:USER/REPO', pretrained=True)",
        'config = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**config)',
        "labels = model.pretrained_cfg.get('label_names')",
        '```', '',
        *([f'Without `import resnetv2_zoo`, timm does not know `{architecture}` and raises `RuntimeError: Unknown '
           f'model ({architecture})`. That error comes from timm before any code of this package runs, so it cannot '
           "be changed from our side: import the package first, or run timm's own scripts through "
           '`resnetv2-zoo timm SCRIPT.py ARGS...` (train.py, validate.py, benchmark.py, inference.py).', '']
          if ours else []),
        *_card_provenance(architecture, metadata), '',
        f'Files: `{CONFIG_NAME}` (timm config), `{WEIGHTS_NAME}` (weights; its metadata also names the architecture, '
        f'class count and labels). License: {license}.', '',
    ]
    text = '\n'.join(front + body)
    return text + f'{CARD_CHECKSUM_PREFIX}{_text_sha256(text)}{CARD_CHECKSUM_SUFFIX}\n'


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode('utf8')).hexdigest()


def is_own_model_card(path: PathLike) -> bool:
    """A README.md this package wrote and nobody edited since: its last line holds the checksum of the rest."""
    try:
        text = Path(path).read_text(encoding='utf8')
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip('\n').rpartition('\n')
    if not (last.startswith(CARD_CHECKSUM_PREFIX) and last.endswith(CARD_CHECKSUM_SUFFIX)):
        return False
    return last[len(CARD_CHECKSUM_PREFIX):-len(CARD_CHECKSUM_SUFFIX)] == _text_sha256(body + '\n')


def update_model_card(model_dir: PathLike, metadata: Dict[str, str]) -> bool:
    """Regenerate the card of `model_dir` (written by `save_model_dir`) with `metadata` added, atomically.

    For facts known only after the directory was saved (a fine-tuned model's test accuracy). Nothing is
    written, and False returned, unless the README.md is missing or our unedited card.
    """
    model_dir = Path(model_dir)
    readme = model_dir / README_NAME
    if readme.is_symlink() or (readme.exists() and not is_own_model_card(readme)):
        return False
    config = _read_config(model_dir / CONFIG_NAME)
    merged = {**read_weights_metadata(model_dir / WEIGHTS_NAME), **metadata}
    card = model_card(config['architecture'], int(config['num_classes']), config.get('label_names'), merged,
                      config.get('pretrained_cfg'), model_dir.name)
    with atomic_file(readme) as tmp:
        tmp.write_text(card, encoding='utf8')
    return True
