"""Read the weights of a TensorFlow.js layers model (`model.json` + binary shards), with json and numpy only.

A Keras model exported for the web (`tensorflowjs_converter --input_format keras`, or
`tfjs.converters.save_keras_model`) is a folder with `model.json` and `groupN-shardMofK.bin` files.
`model.json`'s `weightsManifest` is a list of groups; each group's shards, concatenated in the order
`paths` lists them, hold the group's `weights` back to back, each `prod(shape) * 4` bytes of
little-endian float32, named `layer/variable` (`res2a_branch2a/kernel`). Only that is read here:
quantized weights (`quantization` entries) and other dtypes are refused, never approximated.

Shard files are opened by name inside the model's folder only: a manifest naming a path outside it,
a missing or short shard, or bytes beyond what the manifest lists are all refused, naming the shard.
"""
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import KerasFileError
from .safe_json import load_json

PathLike = Union[str, os.PathLike]
LayerWeights = Dict[str, Dict[str, np.ndarray]]

MODEL_JSON = 'model.json'
MAX_MODEL_JSON_BYTES = 64 << 20
MAX_TOTAL_BYTES = 4 << 30  # as for the HDF5 readers (keras.files.MAX_TOTAL_BYTES)
FLOAT32_BYTES = 4


def is_tfjs_path(path: PathLike) -> bool:
    """A folder holding `model.json`, or a `.json` file: what `read_tfjs_layers` takes."""
    path = Path(path)
    return (path.is_dir() and (path / MODEL_JSON).is_file()) or path.suffix.lower() == '.json'


def read_tfjs_layers(path: PathLike) -> Tuple[LayerWeights, str, str, Optional[Dict[str, Any]]]:
    """Read a TF.js layers model: `({layer: {variable: float32 array}}, model.json path, keras version,
    the Keras model config in its topology or None)`.

    Args:
        path: the model's folder, or its `model.json`.
    """
    path = Path(path)
    model_json = path / MODEL_JSON if path.is_dir() else path
    source = str(model_json)
    if not model_json.is_file():
        raise KerasFileError(f'{model_json}: no such file; a TF.js layers model is a folder with model.json')
    if model_json.stat().st_size > MAX_MODEL_JSON_BYTES:
        raise KerasFileError(f'{source} is {model_json.stat().st_size} bytes, over the {MAX_MODEL_JSON_BYTES}-byte '
                             'limit for a model.json')
    try:
        data = model_json.read_bytes()
    except OSError as e:
        raise KerasFileError(f'{source} cannot be read: {e}') from e
    model = load_json(data, source)  # refuses bad UTF-8 / JSON and hostile nesting, naming the file
    if not isinstance(model, dict) or not isinstance(model.get('weightsManifest'), list):
        raise KerasFileError(f'{source} has no weightsManifest list; expected a TF.js layers model')
    model_format = model.get('format', 'layers-model')
    if model_format != 'layers-model':
        raise KerasFileError(f'{source} is a TF.js {model_format!r}; only a layers model (a Keras export) holds '
                             'Keras layer names')

    groups = [_check_group(source, index, group) for index, group in enumerate(model['weightsManifest'])]
    total = sum(nbytes for group in groups for _, _, nbytes in group[1])
    if total > MAX_TOTAL_BYTES:
        raise KerasFileError(f'{source}: the manifest lists {total} bytes of weights, over the {MAX_TOTAL_BYTES}-byte '
                             'limit')
    layers: LayerWeights = {}
    for shard_names, entries in groups:
        buffer = _read_group(model_json.parent, source, shard_names, sum(nbytes for _, _, nbytes in entries))
        offset = 0
        for name, shape, nbytes in entries:
            value = np.frombuffer(buffer, dtype='<f4', count=nbytes // FLOAT32_BYTES, offset=offset).reshape(shape)
            offset += nbytes
            parts = name.split('/')
            if len(parts) < 2:
                raise KerasFileError(f'{source}: weight {name!r} is not named layer/variable')
            layer, var = parts[-2], parts[-1].split(':')[0]
            layer_vars = layers.setdefault(layer, {})
            if var in layer_vars:
                raise KerasFileError(f'{source}: layer {layer!r} variable {var!r} appears twice')
            layer_vars[var] = value.astype(np.float32)  # native byte order, writable, its own memory
    topology = model.get('modelTopology')
    keras_version = str(topology.get('keras_version', 'unknown')) if isinstance(topology, dict) else 'unknown'
    model_config = topology.get('model_config') if isinstance(topology, dict) else None
    return layers, source, keras_version, model_config if isinstance(model_config, dict) else None


def _check_group(source: str, index: int, group: Any) -> Tuple[List[str], List[Tuple[str, Tuple[int, ...], int]]]:
    """(shard file names, [(weight name, shape, byte size)]) of one manifest group, or a KerasFileError."""
    if not isinstance(group, dict) or not isinstance(group.get('paths'), list) \
            or not isinstance(group.get('weights'), list):
        raise KerasFileError(f'{source}: weightsManifest[{index}] needs `paths` and `weights` lists')
    shard_names = []
    for shard in group['paths']:
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or re.match(r'^[A-Za-z]:', shard) \
                or '..' in re.split(r'[/\\]', shard):
            raise KerasFileError(f'{source}: shard path {shard!r} points outside the model folder; refusing it')
        shard_names.append(shard)
    entries = []
    for spec in group['weights']:
        name = spec.get('name') if isinstance(spec, dict) else None
        shape = spec.get('shape') if isinstance(spec, dict) else None
        if not isinstance(name, str) or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise KerasFileError(f'{source}: weightsManifest[{index}] has a malformed weight entry {spec!r:.200}')
        dtype = spec.get('dtype', 'float32')
        if 'quantization' in spec:
            quantized = spec['quantization'].get('dtype', '?') if isinstance(spec['quantization'], dict) else '?'
            raise KerasFileError(f'{source}: weight {name!r} is quantized to {quantized}; only float32 weights can '
                                 'be converted exactly (re-export without --quantize_*)')
        if dtype != 'float32':
            raise KerasFileError(f'{source}: weight {name!r} has dtype {dtype!r}; only float32 weights are accepted')
        entries.append((name, tuple(shape), math.prod(shape) * FLOAT32_BYTES))
    return shard_names, entries


def _read_group(folder: Path, source: str, shard_names: List[str], needed: int) -> bytearray:
    """The group's shards concatenated; exactly `needed` bytes, or a KerasFileError naming the shard at fault."""
    sizes = []
    for shard in shard_names:
        file = folder / shard
        if not file.is_file():
            raise KerasFileError(f'{source}: shard {shard} is missing (expected {file})')
        sizes.append(file.stat().st_size)
    found = sum(sizes)
    if found != needed:
        # TF.js writes every shard but the last at the same size: a shard of another size is the damaged one.
        full = max(sizes[:-1], default=0)
        odd = [name for name, size in zip(shard_names[:-1], sizes[:-1]) if size != full]
        at_fault = odd[0] if odd else shard_names[-1]
        kind = 'truncated' if found < needed else 'longer than the manifest says'
        raise KerasFileError(f'{source}: shard {at_fault} is {kind}: the manifest lists {needed} bytes for shards '
                             f'{shard_names[0]}..{shard_names[-1]}, they hold {found}')
    buffer = bytearray(needed)
    offset = 0
    for shard, size in zip(shard_names, sizes):
        with open(folder / shard, 'rb') as f:
            read = f.readinto(memoryview(buffer)[offset:offset + size])
        if read != size:
            raise KerasFileError(f'{source}: shard {shard} changed while it was read ({read} of {size} bytes)')
        offset += size
    return buffer
