"""Convert a Keras ResNet50V2 / 101V2 / 152V2 checkpoint into a timm `resnet*v2_keras` model.

Weights are matched by Keras layer name through `keras_names` (never by order or shape), and the
file must match the architecture exactly: every tensor in it is used and every model tensor is
filled, or the conversion fails and says which layers and tensors differ. Nothing here imports
TensorFlow except `--verify` (and converting a live `keras.Model`, which the caller already built).
"""
import argparse
import functools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv

from .. import __version__
from ..errors import KerasFileError, ResNetV2ZooError
from ..keras.files import KerasWeights, file_hexdigest, read_keras_weights
from ..keras.spec import KERAS_RESNETS, iter_tensor_names, keras_class, keras_layer_names, layer_vars, to_torch_layout
from .checkpoint import check_writable_parent, load_model, save_model_dir, save_weights_file

PathLike = Union[str, os.PathLike]
ARCHS = tuple(KERAS_RESNETS)
MAX_LISTED = 12  # problems listed per kind in an error message
NONFINITE = 'non-finite values (pass --allow-nonfinite / allow_nonfinite=True to accept them)'

_BLOCK_LAYER_RE = re.compile(r'^conv(?P<stage>[2-5])_block(?P<block>\d+)_')
# Layers that exist in Keras's ResNet (v1) but not in ResNetV2.
_RESNET_V1_RE = re.compile(r'^(conv1_bn|conv\d_block\d+_(0_bn|3_bn))$')



@dataclass
class ConvertedKeras:
    """A Keras checkpoint as a timm state dict, with what is needed to build and describe the model."""

    arch: str  # 'resnet50v2_keras' | 'resnet101v2_keras' | 'resnet152v2_keras'
    num_classes: int  # 0 when the file has no top
    state_dict: Dict[str, torch.Tensor]  # views in Keras's memory order; see keras_names.to_torch_layout
    metadata: Dict[str, str]  # source_file, keras_version, converter_version, source_format


def convert_keras(source: Union[PathLike, Any], arch: str = 'auto', allow_nonfinite: bool = False) -> ConvertedKeras:
    """Read a Keras ResNetV2 file (legacy `.h5`, `.weights.h5`, `.keras`) or a live `keras.Model`.

    Args:
        source: the file, or the model.
        arch: 'auto' to take the depth from the file, or the expected architecture (refused if the
            file holds another one).
        allow_nonfinite: accept NaN and Inf values (refused by default: they are a damaged or diverged
            checkpoint, and would only show up later as NaN outputs).
    """
    if arch != 'auto' and arch not in ARCHS:
        raise ResNetV2ZooError(f'unknown arch {arch!r}; expected auto or one of {", ".join(ARCHS)}')
    weights = read_keras_weights(source, layer_order=_weights_h5_layer_order)
    arch = _detect_arch(weights, arch)
    num_classes = _num_classes(weights)
    state_dict = _assemble_state_dict(weights, arch, num_classes, allow_nonfinite)
    metadata = {
        'source_file': Path(source).name if _is_file(source) else weights.source,
        'keras_version': weights.keras_version,
        'converter_version': __version__,
        'source_format': weights.source_format,
    }
    return ConvertedKeras(arch, num_classes, state_dict, metadata)


def build_model(converted: ConvertedKeras, **create_kwargs: Any) -> torch.nn.Module:
    """The timm model holding the converted weights, in eval mode.

    `create_kwargs` go to `timm.create_model` (e.g. `global_pool`, `drop_rate`); as with timm's
    pretrained weights, a `num_classes` other than the file's gets a new classifier and an
    `in_chans` other than 3 an adapted stem conv.
    """
    num_classes = create_kwargs.pop('num_classes', converted.num_classes)
    model = timm.create_model(converted.arch, num_classes=converted.num_classes, **create_kwargs)
    state_dict = converted.state_dict
    if model.in_chans != 3:
        stem = adapt_input_conv(model.in_chans, state_dict['stem.conv.weight'])
        state_dict = {**state_dict, 'stem.conv.weight': stem}
    model.load_state_dict(state_dict, strict=True)
    if num_classes != converted.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def convert_to_dir(source: Union[PathLike, Any], out_dir: PathLike, arch: str = 'auto',
                   label_names: Optional[Sequence[str]] = None, allow_nonfinite: bool = False) -> Path:
    """Convert and write `out_dir` in timm's `save_for_hf` layout; it is loaded back and checked."""
    return _convert_and_write(source, Path(out_dir), arch, label_names, single_file=False,
                              allow_nonfinite=allow_nonfinite)


def convert_to_file(source: Union[PathLike, Any], out_file: PathLike, arch: str = 'auto',
                    label_names: Optional[Sequence[str]] = None, allow_nonfinite: bool = False) -> Path:
    """Convert and write one self-describing `.safetensors` file; it is loaded back and checked."""
    return _convert_and_write(source, Path(out_file), arch, label_names, single_file=True,
                              allow_nonfinite=allow_nonfinite)


def _convert_and_write(source: Union[PathLike, Any], out: Path, arch: str, label_names: Optional[Sequence[str]],
                       single_file: bool, verify: bool = False, allow_nonfinite: bool = False) -> Path:
    check_writable_parent(out)
    converted = convert_keras(source, arch, allow_nonfinite)
    _check_labels(label_names, converted.num_classes)
    if verify:
        from .verify import verify_against_keras  # imports TensorFlow

        verification = verify_against_keras(source, converted)
        print(verification.summary())
        if not verification.passed:
            raise ResNetV2ZooError(f'{source}: Keras and the converted model disagree; nothing written')
    # The hash is for written files only: it costs more than reading the tensors does.
    metadata = {**converted.metadata, 'source_sha256': file_hexdigest(source) if _is_file(source) else ''}
    model = build_model(converted)
    del converted  # the model holds the weights now; keeps the peak near two copies while writing and checking
    if single_file:
        save_weights_file(model, out, label_names, metadata)
    else:
        save_model_dir(model, out, label_names, metadata)
    _check_loads_back(out, model)
    return out


def _is_file(source: Union[PathLike, Any]) -> bool:
    return isinstance(source, (str, os.PathLike))


def _check_labels(label_names: Optional[Sequence[str]], num_classes: int) -> None:
    if label_names is not None and len(label_names) != num_classes:
        raise ResNetV2ZooError(f'{len(label_names)} label names given, but the checkpoint has {num_classes} classes')


def _check_loads_back(out: Path, model: torch.nn.Module) -> None:
    """Load what was written with the package's own loader and require identical tensors."""
    loaded = load_model(out).state_dict()
    expected = model.state_dict()
    if loaded.keys() != expected.keys() or any(not _same_bits(loaded[k], expected[k]) for k in expected):
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
        raise ResNetV2ZooError(f'{out} was written but does not load back to the converted weights; removed it')


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, unlike torch.equal, for which NaN (accepted with allow_nonfinite) differs from itself."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# --- mapping and validation ---

def _detect_arch(weights: KerasWeights, requested: str) -> str:
    names = list(weights.layers)
    v1_layers = [n for n in names if _RESNET_V1_RE.match(n)]
    if v1_layers and 'post_bn' not in weights.layers:
        raise KerasFileError(
            f'{weights.source} is a Keras ResNet (v1) checkpoint (keras.applications.ResNet50/101/152): it has '
            f'layers such as {v1_layers[:3]} and no post_bn. Only ResNet50V2/101V2/152V2 can be converted.')
    block_counts = _block_counts(names)
    if 'conv1_conv' not in weights.layers or not any(block_counts):
        raise KerasFileError(
            f'{weights.source} is not a Keras ResNetV2 checkpoint: expected layers such as conv1_conv, '
            f'conv2_block1_preact_bn and post_bn, found {_listing(names)}')
    detected = [a for a, spec in KERAS_RESNETS.items() if spec.block_counts == block_counts]
    if requested != 'auto':
        if detected and detected[0] != requested:
            raise KerasFileError(f'{weights.source} holds a {detected[0]} (blocks per stage {block_counts}), '
                                 f'not the requested {requested} {KERAS_RESNETS[requested].block_counts}')
        return requested
    if detected:
        return detected[0]
    # Damaged or partial: validate against the nearest architecture, which names what is missing or extra.
    return min(ARCHS, key=lambda a: sum(abs(x - y) for x, y in zip(KERAS_RESNETS[a].block_counts, block_counts)))


def _block_counts(names: Sequence[str]) -> Tuple[int, ...]:
    counts = [0, 0, 0, 0]
    for name in names:
        match = _BLOCK_LAYER_RE.match(name)
        if match:
            stage = int(match['stage']) - 2
            counts[stage] = max(counts[stage], int(match['block']))
    return tuple(counts)


def _num_classes(weights: KerasWeights) -> int:
    kernel = weights.layers.get('predictions', {}).get('kernel')
    return int(kernel.shape[-1]) if kernel is not None and kernel.ndim == 2 else 0


def _assemble_state_dict(weights: KerasWeights, arch: str, num_classes: int,
                         allow_nonfinite: bool) -> Dict[str, torch.Tensor]:
    """Map every Keras tensor to its model tensor, or raise listing every difference at once."""
    model_shapes = _model_shapes(arch, num_classes)
    # BatchNorm's step counters have no Keras counterpart; a converted model has taken no training steps.
    counters = {k.replace('running_var', 'num_batches_tracked'): torch.tensor(0)
                for k in model_shapes if k.endswith('running_var')}
    expected_layers = keras_layer_names(KERAS_RESNETS[arch].block_counts, include_top=num_classes > 0)
    problems: Dict[str, List[str]] = {
        'missing layers': [n for n in expected_layers if n not in weights.layers],
        'unexpected layers': sorted(set(weights.layers) - set(expected_layers)),
        'tensor mismatches': [],
        NONFINITE: [],
    }
    state_dict: Dict[str, torch.Tensor] = {}
    for layer in expected_layers:
        found = weights.layers.get(layer)
        if found is None:
            continue
        for var in sorted(found.keys() - layer_vars(layer).keys()):
            problems['tensor mismatches'].append(f'{layer}: unexpected variable {var!r} {found[var].shape}')
        for keras_var, key in iter_tensor_names(layer):
            expected_shape = _keras_shape(model_shapes[key])
            if keras_var not in found:
                problems['tensor mismatches'].append(f'{layer}: missing variable {keras_var!r} {expected_shape}')
            elif found[keras_var].shape != expected_shape:
                problems['tensor mismatches'].append(
                    f'{layer}/{keras_var}: expected shape {expected_shape}, found {found[keras_var].shape}')
            else:
                state_dict[key] = to_torch_layout(found[keras_var])
                if not allow_nonfinite:
                    problems[NONFINITE].extend(_nonfinite(f'{layer}/{keras_var}', found[keras_var]))
    unfilled = sorted(model_shapes.keys() - state_dict.keys())
    if any(problems.values()) or unfilled:
        lines = [f'{kind}: {_listing(items)}' for kind, items in problems.items() if items]
        if unfilled and not any(problems.values()):  # only possible if the name table and the model disagree
            lines.append(f'model tensors left unfilled: {_listing(unfilled)}')
        raise KerasFileError(f'{weights.source} ({weights.source_format}) does not match {arch} '
                             f'with {num_classes} classes:\n  ' + '\n  '.join(lines))
    return {**state_dict, **counters}


def _nonfinite(name: str, value: np.ndarray) -> List[str]:
    nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
    return [f'{name}: {nan} NaN, {inf} Inf'] if nan or inf else []


@functools.lru_cache(maxsize=8)
def _model_shapes(arch: str, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every model tensor to fill (BatchNorm step counters excepted)."""
    with torch.device('meta'):  # shapes only: nothing allocated
        model = timm.create_model(arch, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}


def _keras_shape(torch_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The Keras layout of a tensor of `torch_shape` (the inverse of `keras_names.to_torch_layout`)."""
    if len(torch_shape) == 4:
        out_chs, in_chs, height, width = torch_shape
        return height, width, in_chs, out_chs
    return tuple(reversed(torch_shape))


def _listing(items: Sequence[str]) -> str:
    shown = ', '.join(str(i) for i in items[:MAX_LISTED])
    return shown + (f' ... and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED else '')


def _weights_h5_layer_order(class_counts: Dict[str, int]) -> Optional[Dict[str, List[str]]]:
    """Layer names per Keras class for a `.weights.h5` without names: the ResNetV2 whose counts match."""
    for block_counts in (spec.block_counts for spec in KERAS_RESNETS.values()):
        for include_top in (True, False):
            by_class: Dict[str, List[str]] = {}
            for name in keras_layer_names(block_counts, include_top):
                by_class.setdefault(keras_class(name), []).append(name)
            if {cls: len(layers) for cls, layers in by_class.items()} == class_counts:
                return by_class
    return None


# --- command line ---

def read_labels(path: PathLike) -> List[str]:
    """One class name per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding='utf8')
    except OSError as e:
        raise ResNetV2ZooError(f'cannot read labels file {path}: {e}') from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert a Keras ResNetV2 checkpoint to a timm model directory',
        description='Convert a Keras ResNet50V2/101V2/152V2 checkpoint (legacy .h5, .weights.h5 or .keras) '
                    "into timm's save_for_hf layout (config.json + model.safetensors), without TensorFlow.")
    parser.add_argument('input', type=Path, help='Keras file')
    parser.add_argument('-o', '--output', type=Path, required=True,
                        help='output directory (or .safetensors file with --single-file)')
    parser.add_argument('--arch', default='auto', choices=('auto', *ARCHS),
                        help='expected architecture (default: detected from the file)')
    parser.add_argument('--labels', type=Path, help='text file with one class name per line')
    parser.add_argument('--single-file', action='store_true', help='write one self-describing .safetensors file')
    parser.add_argument('--allow-nonfinite', action='store_true',
                        help='accept NaN/Inf weights (refused by default, naming the layers that hold them)')
    parser.add_argument('--verify', action='store_true',
                        help='also run Keras (TensorFlow needed) on the same input and compare outputs')
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    labels = read_labels(args.labels) if args.labels else None
    out = _convert_and_write(args.input, args.output, args.arch, labels, args.single_file, args.verify,
                             args.allow_nonfinite)
    print(f'wrote {out}')
