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
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv

from .. import __version__
from ..argtypes import DefaultsHelpFormatter, positive_float
from ..errors import KerasFileError, ResNetV2ZooError
from ..keras.architecture import (
    HIDDEN_ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    DenseLayer,
    KerasArchitecture,
    read_architecture,
)
from ..keras.files import KerasWeights, file_hexdigest, read_keras_weights
from ..keras.spec import (
    KERAS_RESNETS,
    PREPROCESS_MODES,
    canonical_layer_name,
    default_preprocess,
    is_legacy_layer_name,
    iter_tensor_names,
    keras_class,
    keras_layer_names,
    legacy_layer_name,
    preprocess_affine,
    to_torch_layout,
)
from ..keras.tf_checkpoint import find_tf_format
from ..models.resnetv2_keras import BN_EPS
from .checkpoint import (
    check_own_dir,
    check_own_file,
    check_writable_parent,
    create_loaded,
    load_model,
    save_model_dir,
    save_weights_file,
    set_output_activation,
)

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
ARCHS = tuple(KERAS_RESNETS)
MAX_LISTED = 12  # problems listed per kind in an error message
NONFINITE = 'non-finite values (pass --allow-nonfinite / allow_nonfinite=True to accept them)'

_BLOCK_LAYER_RE = re.compile(r'^conv(?P<stage>[2-5])_block(?P<block>\d+)_')
# Layers that exist in only one family: Keras's ResNet (v1) or ResNetV2.
_V1_ONLY_RE = re.compile(r'^(conv1_bn|conv\d_block\d+_(0_bn|3_bn))$')
_V2_ONLY_RE = re.compile(r'^(post_bn|conv\d_block\d+_preact_bn)$')
FAMILY_NAMES = {'v1': 'Keras ResNet (v1)', 'v2': 'Keras ResNetV2'}



@dataclass(frozen=True)
class KerasOptions:
    """What a weights-only file cannot say about its model; each one also overrides what a full file declares.

    None means: what the file declares, else the keras.applications default (said as assumed in `summary`).
    """

    bn_eps: Optional[float] = None  # every BatchNorm's epsilon: Keras's default 1e-3, the applications' 1.001e-5
    pooling: Optional[str] = None  # 'avg' or 'max' (the base's `pooling=`, or the global pooling layer)
    preprocess: Optional[str] = None  # the model's input as the pixels were prepared; one of PREPROCESS_MODES
    hidden_act: Optional[str] = None  # activation of the Dense layers before the last
    output_act: Optional[str] = None  # activation of the last Dense: linear, softmax or sigmoid

    def __post_init__(self) -> None:
        checks = (('pooling', self.pooling, ('avg', 'max')), ('preprocess', self.preprocess, PREPROCESS_MODES),
                  ('hidden_act', self.hidden_act, HIDDEN_ACTIVATIONS),
                  ('output_act', self.output_act, OUTPUT_ACTIVATIONS))
        for name, value, allowed in checks:
            if value is not None and value not in allowed:
                raise ResNetV2ZooError(f'{name} {value!r} is not one of {", ".join(allowed)}')
        if self.bn_eps is not None and not self.bn_eps > 0:
            raise ResNetV2ZooError(f'bn_eps must be > 0, got {self.bn_eps}')


@dataclass
class ConvertedKeras:
    """A Keras checkpoint as a timm state dict, with what is needed to build and describe the model."""

    arch: str  # a KERAS_RESNETS key: 'resnet50_keras' ... 'resnet152v2_keras'
    num_classes: int  # 0 when the file has no top
    state_dict: Dict[str, torch.Tensor]  # views in Keras's memory order; see keras_names.to_torch_layout
    metadata: Dict[str, str]  # source_file, keras_version, converter_version, source_format
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm kwargs: bn_eps, global_pool, head_hidden, ...
    pretrained_cfg: Dict[str, Any] = field(default_factory=dict)  # overrides of the default cfg: mean, std, ...
    output_activation: str = 'softmax'  # the Keras model's last activation: linear, softmax or sigmoid
    summary: str = ''  # one line: what was read from the file and what was assumed
    record: Dict[str, Any] = field(default_factory=dict)  # the same, for config.json (`keras_conversion`)


def convert_keras(source: Union[PathLike, Any], arch: str = 'auto', allow_nonfinite: bool = False,
                  options: Optional[KerasOptions] = None) -> ConvertedKeras:
    """Read a Keras ResNet (v1) or ResNetV2 file (legacy `.h5`, `.weights.h5`, `.keras`, a TF.js layers model
    folder or its `model.json`, a Keras 2 TF checkpoint or SavedModel) or a live `keras.Model`.

    Where the file declares its architecture (`.keras`, a full-model `.h5`, a live model) the model around
    the ResNet is read from it (`keras.architecture`): BatchNorm epsilon, pooling, a Dense head of any depth,
    input Rescaling/Normalization, the input size. A weights-only file takes them from `options`, else from
    keras.applications' defaults; `summary` says which is which.

    Args:
        source: the file, or the model.
        arch: 'auto' to take the depth from the file, or the expected architecture (refused if the
            file holds another one).
        allow_nonfinite: accept NaN and Inf values (refused by default: they are a damaged or diverged
            checkpoint, and would only show up later as NaN outputs).
        options: what the file does not say, or overrides of what it says.
    """
    if arch != 'auto' and arch not in ARCHS:
        raise ResNetV2ZooError(f'unknown arch {arch!r}; expected auto or one of {", ".join(ARCHS)}')
    options = options or KerasOptions()
    weights = read_keras_weights(source, layer_order=_weights_h5_layer_order)
    legacy_names = _canonicalize_layer_names(weights)
    arch = _detect_arch(weights, arch)
    spec = KERAS_RESNETS[arch]
    declared = None
    if weights.model_config is not None and not legacy_names:
        declared = read_architecture(weights.model_config, spec.family, spec.block_counts, weights.source,
                                     weights.layers)
        for name in declared.weighted_input_layers:  # an adapted Normalization: folded into mean/std
            weights.layers.pop(name, None)
    model = _resolve_model(weights, arch, declared, options)
    state_dict = _assemble_state_dict(weights, arch, model, allow_nonfinite, legacy_names=legacy_names)
    official = _is_official(source, weights.source_format, arch, declared, options)
    metadata = {
        'source_file': Path(source).name if _is_file(source) else weights.source,
        'keras_version': weights.keras_version,
        'converter_version': __version__,
        'source_format': weights.source_format,
    }
    return ConvertedKeras(arch, model.num_classes, state_dict, metadata, model.model_kwargs(),
                          _pretrained_cfg(model, metadata['source_file'], official), model.output_act,
                          model.summary(arch, weights), model.record())


@dataclass
class _ResolvedModel:
    """The model to build: what the file declares, overridden by the options, else keras.applications' defaults.

    `sources` says, per fact, where it came from: 'file', 'option' or 'assumed'.
    """

    bn_eps: float
    pooling: str
    dense: List[DenseLayer]  # Keras layer names and widths; the last is the classifier
    output_act: str
    preprocess: str
    input_scale: Tuple[float, ...]  # the input layers of the file, composed (identity without them)
    input_offset: Tuple[float, ...]
    input_layers: List[str]
    input_size: Optional[Tuple[int, int]]
    dropout: float
    sources: Dict[str, str]
    base: str = '(top level)'  # where the ResNet sits in the file's model, e.g. 'functional/resnet50v2'
    ignored: List[str] = field(default_factory=list)  # layers that are the identity at inference (augmentation)

    @property
    def num_classes(self) -> int:
        return self.dense[-1].units if self.dense else 0

    def head_layers(self) -> Dict[str, str]:
        """Keras Dense layer -> the timm module holding it: hidden layers `head.hidden.N`, the last `head.fc`."""
        prefixes = {layer.name: f'head.hidden.{2 * i}' for i, layer in enumerate(self.dense[:-1])}
        if self.dense:
            prefixes[self.dense[-1].name] = 'head.fc'
        return prefixes

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {}
        if self.bn_eps != BN_EPS:
            kwargs['bn_eps'] = self.bn_eps
        if self.pooling != 'avg':
            kwargs['global_pool'] = self.pooling
        if len(self.dense) > 1:
            kwargs['head_hidden'] = [layer.units for layer in self.dense[:-1]]
            kwargs['head_act'] = [layer.activation for layer in self.dense[:-1]]
        if self.dropout:
            kwargs['drop_rate'] = self.dropout
        return kwargs

    def mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """timm's mean/std (on 0-1 RGB input) that give the ResNet exactly the input Keras gave it.

        Keras: base input = x255 * S + O per channel (preprocessing, then the file's input layers);
        timm: (x255 / 255 - mean) / std; so std = 1 / (255 S) and mean = -O / (255 S), in RGB order.
        """
        scale, offset, bgr = preprocess_affine(self.preprocess)
        total_scale = [p * a for p, a in zip(scale, self.input_scale)]
        total_offset = [o * a + b for o, a, b in zip(offset, self.input_scale, self.input_offset)]
        order = (2, 1, 0) if bgr else (0, 1, 2)  # the model's channel order -> RGB
        if any(total_scale[c] == 0 for c in order):
            raise ResNetV2ZooError('the input layers scale a channel by 0; such a model ignores its input')
        std = tuple(1 / (255 * total_scale[c]) for c in order)
        mean = tuple(-total_offset[c] / (255 * total_scale[c]) + 0.0 for c in order)  # + 0.0: no -0.0
        return mean, std

    def describe_head(self) -> str:
        """The Dense layers (with their activations where they came with them), then the output activation."""
        if not self.dense:
            return 'none (pooled features)' if self.pooling else 'none (the feature map)'
        output_said = self.sources.get('output_act', 'file')
        layers = [f'Dense {layer.name!r} ({layer.units}, {layer.activation})' for layer in self.dense]
        if output_said != 'file':  # weights-only: the file holds the Dense layers, not the last one's activation
            layers[-1] = f'Dense {self.dense[-1].name!r} ({self.dense[-1].units})'
        said = {'file': 'from the file', 'option': 'given', 'assumed': 'assumed'}
        text = f'{" -> ".join(layers)} ({said[self.sources["head"]]})'
        if output_said != 'file':
            text += f', output {self.output_act} ({said[output_said]})'
        return text

    def summary(self, arch: str, weights: KerasWeights) -> str:
        def said(key: str) -> str:
            return {'file': 'from the file', 'option': 'given', 'assumed': 'assumed'}[self.sources[key]]

        size = f'{self.input_size[0]}x{self.input_size[1]}' if self.input_size else 'any size'
        layers = f' + {", ".join(self.input_layers)}' if self.input_layers else ''
        return (f'read {arch} from {weights.source} ({weights.source_format}): BatchNorm eps {self.bn_eps:g} '
                f'({said("bn_eps")}); pooling {self.pooling or "none"} ({said("pooling")}); head '
                f'{self.describe_head()}; input {size}, preprocessing {self.preprocess}{layers} '
                f'({said("preprocess")})')

    def record(self) -> Dict[str, Any]:
        mean, std = self.mean_std()
        return {
            'bn_eps': self.bn_eps, 'pooling': self.pooling,
            'head': [{'name': d.name, 'units': d.units, 'activation': d.activation} for d in self.dense],
            'output_activation': self.output_act, 'preprocess': self.preprocess, 'input_layers': self.input_layers,
            'input_size': list(self.input_size) if self.input_size else None, 'mean': list(mean), 'std': list(std),
            'sources': dict(self.sources), 'base': self.base, 'ignored_layers': self.ignored,
        }


def _resolve_model(weights: KerasWeights, arch: str, declared: Optional[KerasArchitecture],
                   options: KerasOptions) -> _ResolvedModel:
    spec = KERAS_RESNETS[arch]
    sources: Dict[str, str] = {}

    def pick(key: str, option: Any, from_file: Any, default: Any) -> Any:
        if option is not None:
            sources[key] = 'option'
            return option
        if from_file is not None:
            sources[key] = 'file'
            return from_file
        sources[key] = 'assumed'
        return default

    if declared is not None:
        dense = [DenseLayer(d.name, d.units, d.activation) for d in declared.dense]
        sources['head'] = 'file'
        bn_eps = pick('bn_eps', options.bn_eps, declared.bn_eps, BN_EPS)
        pooling = pick('pooling', options.pooling, declared.pooling, 'avg')
        input_layers = declared.input_layers
        preprocess = pick('preprocess', options.preprocess, None, 'raw' if input_layers else
                          default_preprocess(spec.family))
        scale, offset, size, dropout = (declared.input_scale, declared.input_offset, declared.input_size,
                                        declared.dropout)
    else:
        dense = _weights_only_head(weights, spec, options)
        sources['head'] = 'option' if options.hidden_act and len(dense) > 1 else 'file'
        bn_eps = pick('bn_eps', options.bn_eps, None, BN_EPS)
        pooling = pick('pooling', options.pooling, None, 'avg')
        preprocess = pick('preprocess', options.preprocess, None, default_preprocess(spec.family))
        input_layers, scale, offset, size, dropout = [], (1.0,) * 3, (0.0,) * 3, None, 0.0
    if options.hidden_act is not None:
        for layer in dense[:-1]:
            layer.activation = options.hidden_act
    if dense:
        last = dense[-1]
        if options.output_act is not None:
            last.activation = options.output_act
            sources['output_act'] = 'option'
        elif declared is None:
            last.activation = 'softmax'  # keras.applications' top; only `predict` reads it
            sources['output_act'] = 'assumed'
    if dense and not pooling:
        raise KerasFileError(f'{weights.source}: Dense layers need global pooling before them; give --pooling avg|max')
    output_act = dense[-1].activation if dense else 'linear'
    return _ResolvedModel(float(bn_eps), pooling, dense, output_act, preprocess, tuple(scale),
                          tuple(offset), list(input_layers), size, dropout, sources,
                          *((declared.base_path, list(declared.ignored)) if declared is not None else ()))


def _weights_only_head(weights: KerasWeights, spec: Any, options: KerasOptions) -> List[DenseLayer]:
    """The Dense layers after the ResNet in a file without an architecture, chained by their shapes.

    Their activations are not in the file: with more than one Dense, `options.hidden_act` must say it.
    """
    base = set(keras_layer_names(spec.block_counts, include_top=False, family=spec.family))
    dense = {name: found['kernel'] for name, found in weights.layers.items()
             if name not in base and found.keys() <= {'kernel', 'bias'} and 'kernel' in found
             and found['kernel'].ndim == 2}
    chain: List[DenseLayer] = []
    width = 2048  # the ResNet's pooled features (both families)
    while dense:
        following = [name for name, kernel in dense.items() if kernel.shape[0] == width]
        if not following:
            break  # left over: reported as unexpected layers
        name = following[0]
        width = int(dense.pop(name).shape[1])
        chain.append(DenseLayer(name, width, 'linear'))
    if len(chain) > 1 and options.hidden_act is None:
        raise KerasFileError(
            f'{weights.source}: {len(chain)} Dense layers follow the ResNet ({", ".join(d.name for d in chain)}), and '
            'a weights-only file does not say their activations; save the whole model with model.save(\'x.keras\') '
            'and convert that, or give --hidden-act (and --output-act, --pooling)')
    return chain


def _is_official(source: Union[PathLike, Any], source_format: str, arch: str,
                 declared: Optional[KerasArchitecture], options: KerasOptions) -> bool:
    """The official Keras ImageNet weights (their published MD5), read as Keras reads them: no options. They are
    Keras 2 weights `.h5` files, so no other file is hashed."""
    if (declared is not None or options != KerasOptions() or source_format != 'legacy_h5_weights'
            or not _is_file(source) or not Path(source).is_file()):
        return False
    return file_hexdigest(source, 'md5') in KERAS_RESNETS[arch].weights_md5


def _pretrained_cfg(model: _ResolvedModel, source_file: str, official: bool) -> Dict[str, Any]:
    """What `build_model` changes in the default cfg: all but the official weights describe the file, not ImageNet."""
    if official:
        return {}
    mean, std = model.mean_std()
    cfg: Dict[str, Any] = {
        'tag': None, 'url': None, 'hf_hub_id': None, 'label_names': None, 'test_input_size': None,
        'test_pool_size': None, 'num_classes': model.num_classes, 'mean': mean, 'std': std,
        'notes': (f'Converted by resnetv2-zoo from the Keras file {source_file}; its accuracy is not known to '
                  'resnetv2-zoo.',),
    }
    if model.input_size:
        height, width = model.input_size
        cfg['input_size'] = (3, height, width)
        cfg['pool_size'] = (-(-height // 32), -(-width // 32))
    return cfg


def build_model(converted: ConvertedKeras, **create_kwargs: Any) -> torch.nn.Module:
    """The timm model holding the converted weights, in eval mode.

    `create_kwargs` go to `timm.create_model` (e.g. `global_pool`, `drop_rate`); as with timm's
    pretrained weights, a `num_classes` other than the file's gets a new classifier and an
    `in_chans` other than 3 an adapted stem conv.
    """
    num_classes = create_kwargs.pop('num_classes', converted.num_classes)
    kwargs = {**converted.model_kwargs, **create_kwargs}
    state_dict = converted.state_dict
    in_chans = kwargs.get('in_chans') or 3  # timm drops arguments given as None
    if in_chans != 3:
        state_dict = {**state_dict, 'stem.conv.weight': adapt_input_conv(in_chans, state_dict['stem.conv.weight'])}
    model = create_loaded(converted.arch, state_dict, num_classes=converted.num_classes, **kwargs)
    if converted.pretrained_cfg:  # the file's own model, not the official ImageNet weights
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **converted.pretrained_cfg}
    set_output_activation(model, converted.output_activation)
    if num_classes != converted.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def convert_to_dir(source: Union[PathLike, Any], out_dir: PathLike, arch: str = 'auto',
                   label_names: Optional[Sequence[str]] = None, allow_nonfinite: bool = False,
                   options: Optional[KerasOptions] = None) -> Path:
    """Convert and write `out_dir` in timm's `save_for_hf` layout; it is loaded back and checked."""
    return _convert_and_write(source, Path(out_dir), arch, label_names, single_file=False,
                              allow_nonfinite=allow_nonfinite, options=options)


def convert_to_file(source: Union[PathLike, Any], out_file: PathLike, arch: str = 'auto',
                    label_names: Optional[Sequence[str]] = None, allow_nonfinite: bool = False,
                    options: Optional[KerasOptions] = None) -> Path:
    """Convert and write one self-describing `.safetensors` file; it is loaded back and checked."""
    return _convert_and_write(source, Path(out_file), arch, label_names, single_file=True,
                              allow_nonfinite=allow_nonfinite, options=options)


def _convert_and_write(source: Union[PathLike, Any], out: Path, arch: str, label_names: Optional[Sequence[str]],
                       single_file: bool, verify: bool = False, allow_nonfinite: bool = False,
                       options: Optional[KerasOptions] = None, announce: Optional[Callable[[str], None]] = None
                       ) -> Path:
    check_writable_parent(out)
    _check_output(source, out, single_file)
    converted = convert_keras(source, arch, allow_nonfinite, options)
    (announce or _logger.info)(converted.summary)  # the command prints it; the Python API logs it
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
    metadata = {**converted.metadata, 'source_sha256': _source_digest(source), **parity,
                'keras_conversion': json.dumps(converted.record)}
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


def _assemble_state_dict(weights: KerasWeights, arch: str, model: '_ResolvedModel',
                         allow_nonfinite: bool, legacy_names: bool = False) -> Dict[str, torch.Tensor]:
    """Map every Keras tensor to its model tensor, or raise listing every difference at once.

    With `legacy_names`, layers are named in messages as the file names them (`res2a_branch2a`).
    """
    spec = KERAS_RESNETS[arch]
    head_hidden = tuple(layer.units for layer in model.dense[:-1])
    model_shapes = _model_shapes(arch, model.num_classes, head_hidden)
    # BatchNorm's step counters have no Keras counterpart; a converted model has taken no training steps.
    counters = {k.replace('running_var', 'num_batches_tracked'): torch.tensor(0)
                for k in model_shapes if k.endswith('running_var')}
    head = model.head_layers()
    expected_layers = keras_layer_names(spec.block_counts, include_top=False, family=spec.family) + list(head)

    def shown(layer: str) -> str:
        return legacy_layer_name(layer, spec.block_counts) if legacy_names else layer

    def tensors(layer: str) -> Iterator[Tuple[str, str]]:
        if layer in head:
            return iter((('kernel', f'{head[layer]}.weight'), ('bias', f'{head[layer]}.bias')))
        return iter_tensor_names(layer, spec.family)

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
        known = dict(tensors(layer))
        for var in sorted(found.keys() - known.keys()):
            problems['tensor mismatches'].append(f'{name}: unexpected variable {var!r} {found[var].shape}')
        for keras_var, key in known.items():
            expected_shape = _keras_shape(model_shapes[key])
            if keras_var not in found:
                if layer in head and keras_var == 'bias':  # Dense(use_bias=False): a zero bias is the same layer
                    state_dict[key] = torch.zeros(model_shapes[key])
                else:
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
                             f'with {model.num_classes} classes:\n  ' + '\n  '.join(lines))
    if preprocess_affine(model.preprocess)[2]:  # BGR input (caffe): the stem conv is made to take RGB
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
def _model_shapes(arch: str, num_classes: int, head_hidden: Tuple[int, ...] = ()) -> Dict[str, Tuple[int, ...]]:
    """Shape of every model tensor to fill (BatchNorm step counters excepted)."""
    with torch.device('meta'):  # shapes only: nothing allocated
        model = timm.create_model(arch, num_classes=num_classes, head_hidden=head_hidden,
                                  head_act=['linear'] * len(head_hidden))
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
                        help='also run Keras (TensorFlow needed) on the model in the file and compare outputs')
    group = parser.add_argument_group(
        'model options', 'what a weights-only file (save_weights, ModelCheckpoint(save_weights_only=True)) cannot say; '
        'each overrides what a .keras or full-model .h5 file declares. Default: what the file declares, else '
        'keras.applications\' choice (printed as assumed)')
    group.add_argument('--bn-eps', type=positive_float, default=None, metavar='EPS',
                       help="every BatchNorm epsilon: 1.001e-5 in keras.applications, 1e-3 for a BatchNormalization() "
                            'built by hand')
    group.add_argument('--pooling', choices=('avg', 'max'), default=None, help='global pooling before the head')
    group.add_argument('--preprocess', choices=PREPROCESS_MODES, default=None,
                       help='how pixels were prepared for the Keras model: tf [-1, 1] (resnet_v2.preprocess_input, '
                            'the V2 default), torch (ImageNet mean/std), caffe (BGR minus mean, the v1 default), '
                            'raw (0-255, as image_dataset_from_directory gives them), unit ([0, 1])')
    group.add_argument('--hidden-act', choices=HIDDEN_ACTIVATIONS, default=None,
                       help='activation of the Dense layers before the last (a weights-only file with a hidden-layer '
                            'head needs it)')
    group.add_argument('--output-act', choices=OUTPUT_ACTIVATIONS, default=None,
                       help="the last Dense's activation: predict applies softmax for linear and softmax, sigmoid "
                            'for sigmoid')
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    labels = read_labels(args.labels) if args.labels else None
    options = KerasOptions(args.bn_eps, args.pooling, args.preprocess, args.hidden_act, args.output_act)
    out = _convert_and_write(args.input, args.output, args.arch, labels, args.single_file, args.verify,
                             args.allow_nonfinite, options, announce=print)
    print(f'wrote {out}')
