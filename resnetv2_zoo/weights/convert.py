"""Convert a Keras ResNet50/101/152 (v1) or ResNet50V2/101V2/152V2 checkpoint into its timm `*_keras` model.

The family (v1 or V2) and the depth are read from the layer names; v1 files may use the keras.applications
names or the original Keras 2 names (`res2a_branch2a`, ...), and v1's BGR input order is folded into the
stem conv so that the converted model takes RGB.

Weights are matched by Keras layer name through `keras_names` (never by order or shape), and the
file must match the architecture exactly: every tensor in it is used and every model tensor is
filled, or the conversion fails and says which layers and tensors differ. Nothing here imports
TensorFlow except `--verify` (and converting a live `keras.Model`, which the caller already built).
"""
import argparse
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv

from .. import __version__
from ..argtypes import DefaultsHelpFormatter
from ..errors import KerasFileError, ResNetV2ZooError
from ..keras.files import KerasWeights, file_hexdigest, read_keras_weights
from ..keras.spec import (
    KERAS_RESNETS,
    canonical_layer_name,
    is_legacy_layer_name,
    iter_tensor_names,
    keras_class,
    keras_layer_names,
    layer_vars,
    legacy_layer_name,
    to_torch_layout,
)
from ..keras.tf_checkpoint import find_tf_format
from .checkpoint import (
    check_own_dir,
    check_own_file,
    check_writable_parent,
    load_model,
    save_model_dir,
    save_weights_file,
)

PathLike = Union[str, os.PathLike]
ARCHS = tuple(KERAS_RESNETS)
MAX_LISTED = 12  # problems listed per kind in an error message
NONFINITE = 'non-finite values (pass --allow-nonfinite / allow_nonfinite=True to accept them)'

_BLOCK_LAYER_RE = re.compile(r'^conv(?P<stage>[2-5])_block(?P<block>\d+)_')
# Layers that exist in only one family: Keras's ResNet (v1) or ResNetV2.
_V1_ONLY_RE = re.compile(r'^(conv1_bn|conv\d_block\d+_(0_bn|3_bn))$')
_V2_ONLY_RE = re.compile(r'^(post_bn|conv\d_block\d+_preact_bn)$')
FAMILY_NAMES = {'v1': 'Keras ResNet (v1)', 'v2': 'Keras ResNetV2'}



@dataclass
class ConvertedKeras:
    """A Keras checkpoint as a timm state dict, with what is needed to build and describe the model."""

    arch: str  # a KERAS_RESNETS key: 'resnet50_keras' ... 'resnet152v2_keras'
    num_classes: int  # 0 when the file has no top
    state_dict: Dict[str, torch.Tensor]  # views in Keras's memory order; see keras_names.to_torch_layout
    metadata: Dict[str, str]  # source_file, keras_version, converter_version, source_format


def convert_keras(source: Union[PathLike, Any], arch: str = 'auto', allow_nonfinite: bool = False) -> ConvertedKeras:
    """Read a Keras ResNet (v1) or ResNetV2 file (legacy `.h5`, `.weights.h5`, `.keras`, a TF.js layers model
    folder or its `model.json`) or a live `keras.Model`.

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
    legacy_names = _canonicalize_layer_names(weights)
    arch = _detect_arch(weights, arch)
    num_classes = _num_classes(weights)
    state_dict = _assemble_state_dict(weights, arch, num_classes, allow_nonfinite, legacy_names=legacy_names)
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
    _check_output(source, out, single_file)
    converted = convert_keras(source, arch, allow_nonfinite)
    _check_labels(label_names, converted.num_classes)
    parity: Dict[str, str] = {}
    if verify:
        from .verify import verify_against_keras  # imports TensorFlow

        verification = verify_against_keras(source, converted)
        print(verification.summary())
        if not verification.passed:
            raise ResNetV2ZooError(f'{source}: Keras and the converted model disagree; nothing written')
        # recorded with the weights, and quoted by the model card
        parity = dict(verify_max_abs_diff=f'{verification.max_abs_diff:.6g}',
                      verify_tolerance=f'{verification.tolerance:.6g}', verify_output=verification.output)
    # The hash is for written files only: it costs more than reading the tensors does.
    metadata = {**converted.metadata, 'source_sha256': _source_digest(source), **parity}
    model = build_model(converted)
    del converted  # the model holds the weights now; keeps the peak near two copies while writing and checking
    # Checked before it replaces anything: a bad output never lands, and a previous one stays as it was.
    check = functools.partial(_check_loads_back, out=out, model=model)
    if single_file:
        save_weights_file(model, out, label_names, metadata, check=check)
    else:
        save_model_dir(model, out, label_names, metadata, check=check)
    return out


def _check_output(source: Union[PathLike, Any], out: Path, single_file: bool) -> None:
    """Refuse, before any work, an output that would destroy the input or something this package did not write.

    An existing `out` is replaced only when it is one of our own outputs of the same kind (see
    `checkpoint.check_own_dir` / `check_own_file`); the check is repeated just before the rename.
    """
    if single_file and out.suffix != '.safetensors':
        raise ResNetV2ZooError(f'--single-file output {out} must end in .safetensors')
    if _is_file(source):
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst:
            raise ResNetV2ZooError(f'refusing to write {out}: it is the input {source}')
        if dst in src.parents:
            raise ResNetV2ZooError(f'refusing to write {out}: the input {source} is inside it')
    if os.path.lexists(out):
        (check_own_file if single_file else check_own_dir)(out)


def _source_digest(source: Union[PathLike, Any]) -> str:
    """SHA-256 of the source file; of its model.json for a TF.js folder; of a TF checkpoint's or SavedModel's
    index, data shards and protos, one after another; '' for a live model."""
    if not _is_file(source):
        return ''
    tf_format = find_tf_format(source)
    if tf_format is not None:
        return tf_format.hexdigest()
    return file_hexdigest(Path(source) / 'model.json' if Path(source).is_dir() else source)


def _is_file(source: Union[PathLike, Any]) -> bool:
    return isinstance(source, (str, os.PathLike))


def _check_labels(label_names: Optional[Sequence[str]], num_classes: int) -> None:
    if label_names is not None and len(label_names) != num_classes:
        raise ResNetV2ZooError(f'{len(label_names)} label names given, but the checkpoint has {num_classes} classes')


def _check_loads_back(written: Path, out: Path, model: torch.nn.Module) -> None:
    """Load the temporary output `written` with the package's own loader and require identical tensors.

    It runs before `written` is renamed to `out`, so a refusal leaves nothing new and any previous
    `out` as it was.
    """
    try:
        loaded = load_model(written).state_dict()
    except ResNetV2ZooError as e:
        raise ResNetV2ZooError(f'{out} would not load back ({e}); nothing was written') from e
    expected = model.state_dict()
    if loaded.keys() != expected.keys() or any(not _same_bits(loaded[k], expected[k]) for k in expected):
        raise ResNetV2ZooError(f'{out} would not load back to the converted weights; nothing was written')


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, unlike torch.equal, for which NaN (accepted with allow_nonfinite) differs from itself."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# --- mapping and validation ---

def _canonicalize_layer_names(weights: KerasWeights) -> bool:
    """Rename original-spelling v1 layers (`res2a_branch2a`) to their keras.applications names, in place.

    Returns whether the file used the original spelling, so that messages can name layers as it does.
    """
    if not any(is_legacy_layer_name(name) for name in weights.layers):
        return False
    renamed: Dict[str, Dict[str, np.ndarray]] = {}
    original: Dict[str, str] = {}
    for name, variables in weights.layers.items():
        canonical = canonical_layer_name(name)
        if canonical in renamed:
            raise KerasFileError(f'{weights.source}: layers {original[canonical]!r} and {name!r} are the same layer '
                                 f'({canonical}) under its two spellings')
        renamed[canonical], original[canonical] = variables, name
    weights.layers = renamed
    return True


def _detect_family(weights: KerasWeights) -> Optional[str]:
    """'v1' or 'v2' from the layers only one family has; None if the file has neither kind."""
    v1_layers = [n for n in weights.layers if _V1_ONLY_RE.match(n)]
    v2_layers = [n for n in weights.layers if _V2_ONLY_RE.match(n)]
    if v1_layers and v2_layers:
        raise KerasFileError(f'{weights.source} mixes layers of a {FAMILY_NAMES["v1"]} ({_listing(v1_layers[:3])}) '
                             f'and a {FAMILY_NAMES["v2"]} ({_listing(v2_layers[:3])}); it is neither')
    return 'v1' if v1_layers else 'v2' if v2_layers else None


def _detect_arch(weights: KerasWeights, requested: str) -> str:
    names = list(weights.layers)
    block_counts = _block_counts(names)
    if 'conv1_conv' not in weights.layers or not any(block_counts):
        raise KerasFileError(
            f'{weights.source} is not a Keras ResNet or ResNetV2 checkpoint: expected layers such as conv1_conv, '
            f'conv2_block1_1_conv and conv1_bn (v1) or post_bn (V2), or the original v1 names conv1, bn_conv1, '
            f'res2a_branch2a, found {_listing(names)}')
    family = _detect_family(weights)
    candidates = [a for a, spec in KERAS_RESNETS.items() if family is None or spec.family == family]
    detected = [a for a in candidates if KERAS_RESNETS[a].block_counts == block_counts]
    if requested != 'auto':
        wanted = KERAS_RESNETS[requested]
        if family is not None and wanted.family != family:
            found = detected[0] if detected else f'a model with blocks per stage {block_counts}'
            raise KerasFileError(
                f'{weights.source} is a {FAMILY_NAMES[family]} checkpoint ({found}), not a '
                f'{FAMILY_NAMES[wanted.family]} like the requested {requested}; the two families are different '
                f'networks: convert it with --arch {detected[0] if detected else "auto"}')
        if detected and detected[0] != requested:
            raise KerasFileError(f'{weights.source} holds a {detected[0]} (blocks per stage {block_counts}), '
                                 f'not the requested {requested} {KERAS_RESNETS[requested].block_counts}')
        return requested
    if detected:
        return detected[0]
    # Damaged or partial: validate against the nearest architecture, which names what is missing or extra.
    return min(candidates, key=lambda a: sum(abs(x - y) for x, y in zip(KERAS_RESNETS[a].block_counts, block_counts)))


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
                         allow_nonfinite: bool, legacy_names: bool = False) -> Dict[str, torch.Tensor]:
    """Map every Keras tensor to its model tensor, or raise listing every difference at once.

    With `legacy_names`, layers are named in messages as the file names them (`res2a_branch2a`).
    """
    spec = KERAS_RESNETS[arch]
    model_shapes = _model_shapes(arch, num_classes)
    # BatchNorm's step counters have no Keras counterpart; a converted model has taken no training steps.
    counters = {k.replace('running_var', 'num_batches_tracked'): torch.tensor(0)
                for k in model_shapes if k.endswith('running_var')}
    expected_layers = keras_layer_names(spec.block_counts, include_top=num_classes > 0, family=spec.family)

    def shown(layer: str) -> str:
        return legacy_layer_name(layer, spec.block_counts) if legacy_names else layer

    problems: Dict[str, List[str]] = {
        'missing layers': [shown(n) for n in expected_layers if n not in weights.layers],
        'unexpected layers': sorted(shown(n) for n in set(weights.layers) - set(expected_layers)),
        'tensor mismatches': [],
        NONFINITE: [],
    }
    state_dict: Dict[str, torch.Tensor] = {}
    for layer in expected_layers:
        found = weights.layers.get(layer)
        if found is None:
            continue
        name = shown(layer)
        for var in sorted(found.keys() - layer_vars(layer, spec.family).keys()):
            problems['tensor mismatches'].append(f'{name}: unexpected variable {var!r} {found[var].shape}')
        for keras_var, key in iter_tensor_names(layer, spec.family):
            expected_shape = _keras_shape(model_shapes[key])
            if keras_var not in found:
                problems['tensor mismatches'].append(f'{name}: missing variable {keras_var!r} {expected_shape}')
            elif found[keras_var].shape != expected_shape:
                problems['tensor mismatches'].append(
                    f'{name}/{keras_var}: expected shape {expected_shape}, found {found[keras_var].shape}')
            else:
                state_dict[key] = to_torch_layout(found[keras_var])
                if not allow_nonfinite:
                    problems[NONFINITE].extend(_nonfinite(f'{name}/{keras_var}', found[keras_var]))
    unfilled = sorted(model_shapes.keys() - state_dict.keys())
    if any(problems.values()) or unfilled:
        lines = [f'{kind}: {_listing(items)}' for kind, items in problems.items() if items]
        if unfilled and not any(problems.values()):  # only possible if the name table and the model disagree
            lines.append(f'model tensors left unfilled: {_listing(unfilled)}')
        raise KerasFileError(f'{weights.source} ({weights.source_format}) does not match {arch} '
                             f'with {num_classes} classes:\n  ' + '\n  '.join(lines))
    if spec.family == 'v1':
        state_dict['stem.conv.weight'] = bgr_to_rgb_stem(state_dict['stem.conv.weight'])
    return {**state_dict, **counters}


def bgr_to_rgb_stem(weight: torch.Tensor) -> torch.Tensor:
    """Keras's v1 takes BGR input ('caffe' preprocessing); reversing the stem conv's input channels makes the
    same network take RGB, as timm's transforms deliver it. Its own inverse."""
    return weight.flip(1)


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
    """Layer names per Keras class for a `.weights.h5` without names: the ResNet whose counts match."""
    for spec in KERAS_RESNETS.values():
        for include_top in (True, False):
            by_class: Dict[str, List[str]] = {}
            for name in keras_layer_names(spec.block_counts, include_top, spec.family):
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
        'convert', help='convert a Keras ResNet or ResNetV2 checkpoint to a timm model directory',
        formatter_class=DefaultsHelpFormatter,
        description='Convert a Keras ResNet50/101/152 or ResNet50V2/101V2/152V2 checkpoint (legacy .h5, .weights.h5, '
                    '.keras or a TF.js layers model folder; '
                    'a Keras 2 TensorFlow checkpoint or SavedModel directory) '
                    "into timm's save_for_hf layout (config.json + model.safetensors), without TensorFlow.")
    parser.add_argument('input', type=Path,
                        help='Keras file (.h5, .weights.h5, .keras); a Keras 2 SavedModel directory (model.save(dir)); '
                             'a TF checkpoint from save_weights / ModelCheckpoint: its prefix (cp.ckpt), its .index '
                             'file, or the folder holding its `checkpoint` file (the latest is taken)')
    parser.add_argument('-o', '--output', type=Path, required=True,
                        help='output directory (or .safetensors file with --single-file); an existing one is '
                             'replaced only if resnetv2-zoo wrote it (or it is an empty directory)')
    parser.add_argument('--arch', default='auto', choices=('auto', *ARCHS),
                        help='expected architecture; auto: detected from the file')
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
