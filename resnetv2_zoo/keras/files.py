"""Read the weights of any Keras file format into plain arrays, with h5py and zipfile only.

Every reader returns the same thing, `KerasWeights`: `{keras_layer_name: {keras_var_name: array}}`
plus where it came from. No TensorFlow and no Keras here: only the live-`keras.Model` path touches
Keras, through the model object it is handed. Formats:

* `legacy_h5_weights`: Keras 2 HDF5 weights (the official `*_tf_dim_ordering_tf_kernels*.h5`).
* `legacy_h5_model`: a full-model `.h5` (`model.save('x.h5')`), the same layout under `model_weights`.
* `weights_h5`: Keras 3 `.weights.h5`, keyed by class with a per-class counter (`layers/conv2d_3/vars/0`);
  Keras >= 3.6 also stores the layer name in `vars.attrs['name']`, older files need `layer_order`.
* `keras_zip`: a `.keras` archive, read in memory; its `config.json` names the layers of older files.
* `live_model`: a `keras.Model` object.
* `tfjs_layers`: a TensorFlow.js layers model (folder with `model.json` + shards), read by `keras.tfjs`.
"""
import hashlib
import io
import json
import math
import os
import re
import struct
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

from ..errors import KerasFileError
from .safe_json import JsonDoc, load_json
from .safe_json import join as json_join
from .tfjs import is_tfjs_path, read_tfjs_layers

PathLike = Union[str, os.PathLike]
LayerWeights = Dict[str, Dict[str, np.ndarray]]
# Class counts of a name-less `.weights.h5` ({'conv2d': 69, ...}) -> layer names per class, in Keras's
# numbering, or None when no known model has these counts.
LayerOrder = Callable[[Dict[str, int]], Optional[Dict[str, Sequence[str]]]]

# Caps checked on declared sizes before anything is read or decompressed. The largest ResNet152V2 tensor is
# 9 MiB (2.4 MiB for float32 kernels, the 1000-class dense 8 MiB) and the whole model 240 MiB; the caps
# leave room for heads of 100k+ classes.
MAX_TENSOR_BYTES = 1 << 30
MAX_TOTAL_BYTES = 4 << 30
# ResNet152V2's config.json is 0.5 MiB; 16 MiB keeps what `json.loads` can build from it to a few hundred MiB.
MAX_ZIP_MEMBER_BYTES = {'model.weights.h5': MAX_TOTAL_BYTES, 'config.json': 16 << 20, 'metadata.json': 1 << 20}
# What h5py raises on a damaged file, depending on where the damage is: HDF5 errors surface as OSError,
# KeyError or RuntimeError, bad metadata decodes as ValueError / TypeError / IndexError.
H5PY_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError)

# Order in which Keras 3 `save_own_variables` numbers the variables of a layer (trainable, then the rest).
KERAS3_VAR_NAMES: Dict[str, Tuple[str, ...]] = {
    'conv2d': ('kernel', 'bias'),
    'dense': ('kernel', 'bias'),
    'batch_normalization': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
    'normalization': ('mean', 'variance', 'count'),  # an adapted input Normalization (see keras.architecture)
}


@dataclass
class KerasWeights:
    """The weights of one Keras model, by layer name, and what the file says about itself."""

    layers: LayerWeights
    source: str  # the file path, or a description of a live model, for messages
    source_format: str
    keras_version: str = 'unknown'
    # the model's architecture, {'class_name': ..., 'config': ...}, where the file has one (`.keras` config.json,
    # a full-model `.h5`'s `model_config`, a live model); read by `keras.architecture`
    model_config: Optional[Dict[str, Any]] = None


def read_keras_weights(
        source: Union[PathLike, Any],
        layer_order: Optional[LayerOrder] = None,
) -> KerasWeights:
    """Read a Keras file (any format above) or a live `keras.Model`.

    Args:
        source: a path, or a `keras.Model`.
        layer_order: names the layers of a `.weights.h5` that has no layer names and no `config.json`.
    """
    if not isinstance(source, (str, os.PathLike)):
        return _read_live_model(source)
    path = Path(source)
    if is_tfjs_path(path):
        return _read_tfjs(path)
    from .tf_checkpoint import find_tf_format, read_tf_weights  # imports this module's helpers

    tf_format = find_tf_format(path)  # a TF checkpoint (prefix, .index, folder) or a SavedModel directory
    if tf_format is not None:
        return read_tf_weights(tf_format)
    if path.is_dir():
        raise KerasFileError(f'{path} is a directory, but neither a SavedModel (saved_model.pb) nor a folder with a '
                             'TensorFlow `checkpoint` file; expected a Keras file (.h5, .weights.h5 or .keras), '
                             'one of those folders, or a checkpoint prefix such as cp.ckpt')
    if not path.is_file():
        raise KerasFileError(f'{path}: no such file')
    if path.stat().st_size == 0:
        raise KerasFileError(f'{path} is empty (0 bytes); expected a Keras weights file')
    if zipfile.is_zipfile(path):
        return _read_keras_zip(path, layer_order)
    if not h5py.is_hdf5(path):
        raise KerasFileError(f'{path} is neither an HDF5 file nor a .keras archive')
    try:
        with open(path, 'rb') as raw, h5py.File(path, 'r') as h5:
            return _read_h5(h5, raw, str(path), layer_order, config=None)
    except KerasFileError:
        raise
    except H5PY_ERRORS as e:
        raise KerasFileError(f'{path} is truncated or corrupt: {type(e).__name__}: {e}') from e


def file_hexdigest(path: PathLike, algorithm: str = 'sha256') -> str:
    """Hex digest of a file, read in chunks (checkpoints are hundreds of megabytes)."""
    digest = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _read_h5(h5: h5py.File, raw: BinaryIO, source: str, layer_order: Optional[LayerOrder],
             config: Optional[Dict[str, Any]]) -> KerasWeights:
    """Tell the three HDF5 layouts apart; `raw` reads the same bytes as `h5` (see `_Structure`);
    `config` is the `.keras` archive's config.json, if any."""
    _check_self_contained(h5, raw, source)
    if 'layer_names' in h5.attrs or 'layer_names0' in h5.attrs:
        return KerasWeights(_read_legacy_group(h5, source), source, 'legacy_h5_weights',
                            _attr_str(h5, 'keras_version', source) or 'unknown')
    if 'model_weights' in h5:
        group = h5['model_weights']
        model_config = None
        if 'model_config' in h5.attrs:
            text = _attr_str(h5, 'model_config', source)
            model_config = load_json(text.encode('utf8'), f'{source}: model_config') if text else None
        return KerasWeights(_read_legacy_group(group, source), source, 'legacy_h5_model',
                            _attr_str(h5, 'keras_version', source) or _attr_str(group, 'keras_version', source)
                            or 'unknown', model_config)
    if 'layers' in h5:
        names = _keras3_names_from_config(config) if config is not None else None
        return KerasWeights(_read_keras3_group(h5, source, names, layer_order), source, 'weights_h5')
    raise KerasFileError(
        f'{source} is an HDF5 file but not a Keras weights file: it has no `layer_names` attribute, '
        f'`model_weights` group or `layers` group (found top-level keys {sorted(h5.keys())[:10]})')


def _check_self_contained(h5: h5py.File, raw: BinaryIO, source: str) -> None:
    """Refuse, before reading any value, a file that would make HDF5 read other files, allocate without bound,
    or hand back values that are not in the file.

    External links, virtual datasets and external raw storage all name other files, which HDF5 opens
    on access; a chunked dataset can declare any size and read back as fill value, a decompression bomb.
    Damage that h5py reads without complaint (found by fuzzing) shows as values never written, or as
    datasets whose values overlap or lie past the end of the file.
    """
    seen = set()
    total_bytes = 0
    spans: List[Tuple[int, int, str]] = []  # (offset, end, name) of each contiguous dataset's values in the file
    structure = _Structure(h5, raw, source)  # where the file's HDF5 metadata lies
    structure.add_object(h5, '/')
    pending = [('/', h5)]
    while pending:
        path, group = pending.pop()
        for name in group:
            member = f'{path.rstrip("/")}/{name}'
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise KerasFileError(f'{source}: {member} is an external link to {link.filename}:{link.path}; '
                                     'refusing to read other files')
            if isinstance(link, h5py.SoftLink):
                continue  # points inside this file, at an object the walk reaches by its hard link
            obj = group[name]
            if obj.id in seen:
                continue
            seen.add(obj.id)
            structure.add_object(obj, member)
            if isinstance(obj, h5py.Group):
                pending.append((member, obj))
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual or obj.external:
                    kind = 'a virtual dataset' if obj.is_virtual else 'stored in external files'
                    raise KerasFileError(f'{source}: dataset {member} is {kind}; refusing to read other files')
                _check_float_type(obj, member, source)
                nbytes = (obj.size or 0) * obj.dtype.itemsize
                total_bytes += nbytes
                if nbytes > MAX_TENSOR_BYTES or total_bytes > MAX_TOTAL_BYTES:
                    raise KerasFileError(
                        f'{source}: dataset {member} declares shape {obj.shape} of {obj.dtype} ({nbytes} bytes, '
                        f'{total_bytes} in all so far); a ResNetV2 tensor is at most {MAX_TENSOR_BYTES} bytes '
                        f'and a checkpoint at most {MAX_TOTAL_BYTES}')
                if _unwritten(obj):
                    raise KerasFileError(f'{source}: dataset {member} has only {obj.id.get_storage_size()} of its '
                                         f'{nbytes} bytes of values in the file (the rest would read as fill value); '
                                         'it is truncated or corrupt')
                offset = obj.id.get_offset()
                if offset is not None:
                    spans.append((offset, offset + obj.id.get_storage_size(), member))
    _check_disjoint(spans, structure.spans, h5.id.get_filesize(), source)


def _unwritten(dataset: h5py.Dataset) -> bool:
    """Values never (all) written, which HDF5 reads back as the fill value: Keras always writes every value."""
    if dataset.chunks is None:
        return dataset.id.get_storage_size() < (dataset.size or 0) * dataset.dtype.itemsize
    chunks_needed = math.prod(-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks))
    return dataset.id.get_num_chunks() < chunks_needed


def _check_float_type(dataset: h5py.Dataset, member: str, source: str) -> None:
    """Refuse floats that are not IEEE little-endian binary16/32/64, the only ones Keras writes.

    HDF5 describes a float by its fields (sign, exponent and mantissa positions and sizes, bias,
    normalization, byte order) and converts any such description to the native type on read, so a damaged
    datatype message reads back as other values without an error.
    """
    tid = dataset.id.get_type()
    if tid.get_class() != h5py.h5t.FLOAT or any(tid.equal(ieee) for ieee in _IEEE_FLOATS):
        return  # not a float (refused later if it is a weight), or a standard one
    order = 'big-endian' if tid.get_order() == h5py.h5t.ORDER_BE else 'little-endian'
    sign, exp_pos, exp_size, man_pos, man_size = tid.get_fields()
    raise KerasFileError(
        f'{source}: dataset {member} stores {8 * tid.get_size()}-bit floats that are not IEEE little-endian '
        f'({order}, sign bit {sign}, exponent {exp_size} bits at {exp_pos} with bias {tid.get_ebias()}, mantissa '
        f'{man_size} bits at {man_pos}, {_NORMS.get(tid.get_norm(), "unknown")} normalization); Keras writes IEEE '
        'float16/32/64, so the file is corrupt')


_IEEE_FLOATS = (h5py.h5t.IEEE_F16LE, h5py.h5t.IEEE_F32LE, h5py.h5t.IEEE_F64LE)
_NORMS = {h5py.h5t.NORM_IMPLIED: 'implied-bit', h5py.h5t.NORM_MSBSET: 'msb-set', h5py.h5t.NORM_NONE: 'no'}


class _Structure:
    """The byte ranges of a file's HDF5 metadata, for `_check_disjoint`: every object's header and, for the
    old-style groups that h5py and Keras write (version 1 headers), their continuation chunks, symbol-table
    B-tree nodes, symbol-table nodes and local heaps.

    HDF5 exposes object header addresses (`H5Oget_info`) but not where a group's B-tree and heap lie, so those
    are read from the group's symbol-table message; h5py has just walked the same structures without error.
    """

    def __init__(self, h5: h5py.File, raw: BinaryIO, source: str):
        self.raw, self.source, self.file_size = raw, source, h5.id.get_filesize()
        self.spans: List[Tuple[int, int, str]] = []
        self.leaf_k = self.internal_k = 0  # 0: the superblock is not one whose groups we parse
        super_block = self._read(0, 24, 'the superblock')
        if (h5.userblock_size == 0 and super_block[:8] == b'\x89HDF\r\n\x1a\n' and super_block[8] in (0, 1)
                and super_block[13:15] == b'\x08\x08'):  # 8-byte offsets and lengths
            self.leaf_k, self.internal_k = struct.unpack_from('<HH', super_block, 16)
            self.spans.append((0, 96 + 4 * super_block[8], 'the superblock'))

    def _read(self, offset: int, size: int, what: str) -> bytes:
        data = b''
        if offset + size <= self.file_size:  # else a damaged size, which must not become a huge read
            self.raw.seek(offset)
            data = self.raw.read(size)
        if len(data) != size:
            raise KerasFileError(f'{self.source}: {what} at byte {offset} lies past the end of the file; it is '
                                 'truncated or corrupt')
        return data

    def add_object(self, obj: Union[h5py.Group, h5py.Dataset], member: str) -> None:
        info = h5py.h5o.get_info(obj.id)
        what = f'the object header of {member}'
        if info.hdr.version != 1 or not self.leaf_k:
            size = info.hdr.space.total if info.hdr.nchunks == 1 else 16  # other chunks: not exposed
            self.spans.append((info.addr, info.addr + size, what))
            return
        chunk_size = struct.unpack_from('<I', self._read(info.addr, 16, what), 8)[0]
        chunks = [(info.addr + 16, chunk_size)]
        self.spans.append((info.addr, info.addr + 16, what))
        while chunks:
            start, size = chunks.pop()
            self.spans.append((start, start + size, what))
            data, at = self._read(start, size, what), 0
            while at + 8 <= size:
                kind, length = struct.unpack_from('<HH', data, at)
                body = data[at + 8:at + 8 + length]
                if kind == 0x10 and len(body) >= 16:  # continuation: the header goes on elsewhere
                    chunks.append(struct.unpack_from('<QQ', body))
                elif kind == 0x11 and len(body) >= 16 and isinstance(obj, h5py.Group):  # symbol table
                    btree, heap = struct.unpack_from('<QQ', body)
                    self._add_heap(heap, member)
                    self._add_btree(btree, member)
                at += 8 + length

    def _add_heap(self, offset: int, member: str) -> None:
        what = f'the local heap of group {member}'
        header = self._read(offset, 32, what)
        if header[:4] != b'HEAP':
            raise KerasFileError(f'{self.source}: {what} at byte {offset} has no HEAP signature; it is corrupt')
        size, _, data = struct.unpack_from('<QQQ', header, 8)
        self.spans += [(offset, offset + 32, what), (data, data + size, what)]

    def _add_btree(self, offset: int, member: str, depth: int = 0) -> None:
        what = f'the symbol-table B-tree of group {member}'
        size = 24 + (4 * self.internal_k + 1) * 8
        node = self._read(offset, size, what)
        if node[:4] != b'TREE' or node[4] != 0 or depth > 32:
            raise KerasFileError(f'{self.source}: {what} at byte {offset} is not a group B-tree node; it is corrupt')
        level, entries = node[5], struct.unpack_from('<H', node, 6)[0]
        self.spans.append((offset, offset + size, what))
        for i in range(min(entries, 2 * self.internal_k)):
            child = struct.unpack_from('<Q', node, 24 + 16 * i + 8)[0]
            if level:
                self._add_btree(child, member, depth + 1)
            else:
                self.spans.append((child, child + 8 + 80 * self.leaf_k, f'a symbol-table node of group {member}'))


def _check_disjoint(spans: List[Tuple[int, int, str]], structure: List[Tuple[int, int, str]], file_size: int,
                    source: str) -> None:
    """Keras files carry no checksums; a damaged data address is caught when it makes a tensor's values share
    bytes with another tensor or with the file's HDF5 structure (`_Structure`), or points past the end of the
    file (HDF5 itself checks none of these before reading)."""
    regions = sorted([(offset, end, f'the values of dataset {name}') for offset, end, name in spans] + structure)
    reach, reached_by = -1, ''
    for offset, end, what in regions:
        if offset < reach:
            raise KerasFileError(f'{source}: {reached_by} and {what} overlap in the file; it is corrupt')
        if end > reach:
            reach, reached_by = end, what
    spans.sort(key=lambda span: span[1])
    if spans and spans[-1][1] > file_size:
        raise KerasFileError(f'{source}: the values of dataset {spans[-1][2]} end at byte {spans[-1][1]}, past the '
                             f'end of the file ({file_size} bytes); it is truncated or corrupt')


# --- legacy HDF5 (Keras 2 layout, also written by Keras 3 for `.h5`) ---

def _read_legacy_group(group: h5py.Group, source: str) -> LayerWeights:
    layers: LayerWeights = {}
    group_names = _attr_list(group, 'layer_names', source)
    if 'top_level_model_weights' in group:  # Keras 3: variables of the model itself, outside any layer
        group_names.append('top_level_model_weights')
    for group_name in group_names:
        if group_name not in group:
            raise KerasFileError(f'{source}: layer {group_name!r} is listed in `layer_names` but has no group')
        layer_group = group[group_name]
        for weight_name in _attr_list(layer_group, 'weight_names', source):
            # `conv1_conv/kernel:0` (Keras 2) or `conv1_conv/kernel` (Keras 3); a nested model's group
            # holds its layers' weights, so the layer is the second-to-last part, not the group.
            parts = weight_name.split('/')
            layer = parts[-2] if len(parts) > 1 else group_name
            var = parts[-1].split(':')[0]
            if weight_name not in layer_group:
                raise KerasFileError(f'{source}: layer {layer!r} lists weight {weight_name!r} but has no such dataset')
            _add(layers, source, layer, var, _read_dataset(layer_group[weight_name], source, layer, var))
    return layers


def _attr_list(group: h5py.Group, name: str, source: str) -> List[str]:
    """A string-list attribute; Keras splits long ones into `name0`, `name1`, ... (HDF5 header limit)."""
    if name in group.attrs:
        values = _string_attr(group, name, source)
    else:
        chunks = []
        while f'{name}{len(chunks)}' in group.attrs:
            chunks.append(_string_attr(group, f'{name}{len(chunks)}', source))
        values = np.concatenate(chunks) if chunks else []
    return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def _attr_str(group: h5py.Group, name: str, source: str) -> str:
    value = _string_attr(group, name, source) if name in group.attrs else ''
    return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _string_attr(group: h5py.Group, name: str, source: str) -> Any:
    """The value of a string (or string array) attribute, refused unless HDF5 stores it as strings: a damaged
    datatype message can turn a string into a variable-length sequence of garbage, which HDF5 crashes on.
    Keras writes a layer without weights an empty float array, which has no values to read."""
    attr = group.attrs.get_id(name)
    space = attr.get_space()
    empty = space.get_simple_extent_type() == h5py.h5s.NULL or space.get_simple_extent_npoints() == 0
    if not isinstance(attr.get_type(), h5py.h5t.TypeStringID) and not empty:
        raise KerasFileError(f'{source}: attribute {name!r} of {group.name} is not stored as strings; it is corrupt')
    return group.attrs[name]


# --- Keras 3 `.weights.h5` ---

def _read_keras3_group(h5: h5py.File, source: str, config_names: Optional[Dict[str, str]],
                       layer_order: Optional[LayerOrder]) -> LayerWeights:
    entries = list(_iter_keras3_entries(h5['layers'], 'layers'))
    unnamed = [key for key, vars_group in entries if 'name' not in vars_group.attrs]
    names = {key: _attr_str(vars_group, 'name', source) for key, vars_group in entries if key not in unnamed}
    if unnamed:
        names.update(_recover_keras3_names(source, unnamed, config_names, layer_order))
    layers: LayerWeights = {}
    for key, vars_group in entries:
        layer = names[key]
        var_names = _keras3_var_names(key, len(vars_group))
        for index, var in enumerate(var_names):
            if str(index) not in vars_group:
                raise KerasFileError(f'{source}: layer {layer!r} ({key}) has no variable {index}')
            _add(layers, source, layer, var, _read_dataset(vars_group[str(index)], source, layer, var))
    if 'vars' in h5 and len(h5['vars']):
        raise KerasFileError(f'{source}: the model itself holds variables {sorted(h5["vars"])}, '
                             'which a Keras ResNetV2 does not have')
    return layers


def _iter_keras3_entries(group: h5py.Group, path: str) -> Iterator[Tuple[str, h5py.Group]]:
    """(path, vars group) of every layer that stores variables, nested models included."""
    for key, child in group.items():
        child_path = f'{path}/{key}'
        if 'vars' in child and len(child['vars']):
            yield child_path, child['vars']
        if 'layers' in child:
            yield from _iter_keras3_entries(child['layers'], f'{child_path}/layers')


def _keras3_var_names(key: str, count: int) -> Tuple[str, ...]:
    names = KERAS3_VAR_NAMES.get(_class_key(key)[0], ())
    if len(names) >= count:
        return names[:count]
    return tuple(str(i) for i in range(count))  # an unknown layer kind: keep it, so it is reported as extra


def _class_key(key: str) -> Tuple[str, int]:
    """`layers/conv2d_3` -> ('conv2d', 3): Keras's class-name key and per-class counter."""
    match = re.fullmatch(r'(?P<cls>.*?)(?:_(?P<n>\d+))?', key.rsplit('/', 1)[-1])
    return match['cls'], int(match['n'] or 0)


def _recover_keras3_names(source: str, keys: List[str], config_names: Optional[Dict[str, str]],
                          layer_order: Optional[LayerOrder]) -> Dict[str, str]:
    """Layer names for a `.weights.h5` written before Keras stored them (Keras < 3.6)."""
    if config_names is not None:
        missing = [k for k in keys if k not in config_names]
        if missing:
            raise KerasFileError(f'{source}: config.json has no layer for the weight groups {missing[:5]}')
        return {k: config_names[k] for k in keys}
    nested = [k for k in keys if k.count('/') > 1]
    if nested or layer_order is None:
        raise KerasFileError(f'{source}: a .weights.h5 without layer names and without a config to recover them')
    counts: Dict[str, int] = defaultdict(int)
    for key in keys:
        counts[_class_key(key)[0]] += 1
    order = layer_order(dict(counts))
    if order is None:
        raise KerasFileError(f'{source}: a .weights.h5 without layer names whose layers ({dict(counts)}) '
                             'match no Keras ResNetV2, so they cannot be named')
    names = {}
    for key in keys:
        cls, index = _class_key(key)
        if index >= len(order.get(cls, ())):
            raise KerasFileError(f'{source}: unexpected weight group {key!r}: a Keras ResNetV2 of this size has '
                                 f'{len(order.get(cls, ()))} {cls} layers')
        names[key] = order[cls][index]
    return names


def _keras3_names_from_config(config: Any, where: str = 'config.json') -> Dict[str, str]:
    """Weight-group path -> layer name, numbering layers per class in `config.json` order as Keras does.

    Every value used is type-checked; a bad one is a `KerasFileError` naming `where` and its key path. The
    recursion follows nested models, at most `MAX_JSON_DEPTH / 4` deep (each level is 4 JSON levels).
    """
    doc = JsonDoc(where)
    names: Dict[str, str] = {}

    def visit(model_config: Dict[str, Any], key_path: str, path: str) -> None:
        inner = doc.get(model_config, 'config', dict, key_path, default={})
        layers_path = json_join(json_join(key_path, 'config'), 'layers')
        used: Dict[str, int] = {}
        for i, layer in enumerate(doc.get(inner, 'layers', list, json_join(key_path, 'config'), default=[])):
            layer_path = json_join(layers_path, i)
            layer = doc.expect(layer, dict, layer_path)
            cls = _snake_case(doc.get(layer, 'class_name', str, layer_path))
            layer_name = doc.get(doc.get(layer, 'config', dict, layer_path), 'name', str,
                                 json_join(layer_path, 'config'))
            key = cls if cls not in used else f'{cls}_{used[cls] + 1}'
            used[cls] = used.get(cls, -1) + 1
            names[f'{path}/{key}'] = layer_name
            visit(layer, layer_path, f'{path}/{key}/layers')

    visit(doc.expect(config, dict, ''), '', 'layers')
    return names


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: the class key of a layer in a `.weights.h5`."""
    name = re.sub(r'\W+', '', name)
    name = re.sub('(.)([A-Z][a-z]+)', r'\1_\2', name)
    return re.sub('([a-z])([A-Z])', r'\1_\2', name).lower()


# --- `.keras` archive ---

def _read_keras_zip(path: Path, layer_order: Optional[LayerOrder]) -> KerasWeights:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            _check_zip_members(path, members.values())
            if 'model.weights.h5' not in members:
                raise KerasFileError(f'{path} is a zip archive without model.weights.h5 (found {sorted(members)[:5]}); '
                                     'sharded or npz .keras archives are not supported')
            config = None
            if 'config.json' in members:
                config = load_json(archive.read('config.json'), f'{path}: config.json')
                _keras3_names_from_config(config, f'{path}: config.json')  # checks every value used, before use
            keras_version = 'unknown'
            if 'metadata.json' in members:
                metadata = JsonDoc(f'{path}: metadata.json')
                keras_version = metadata.get(
                    metadata.expect(load_json(archive.read('metadata.json'), metadata.where), dict, ''),
                    'keras_version', str, '', default='unknown')
            weights_bytes = archive.read('model.weights.h5')
    except KerasFileError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise KerasFileError(f'{path} is a damaged .keras archive: {type(e).__name__}: {e}') from e
    try:
        with h5py.File(io.BytesIO(weights_bytes), 'r') as h5:
            weights = _read_h5(h5, io.BytesIO(weights_bytes), str(path), layer_order, config=config)
    except KerasFileError:
        raise
    except H5PY_ERRORS as e:
        raise KerasFileError(f'{path}: model.weights.h5 in the archive is corrupt: {type(e).__name__}: {e}') from e
    weights.source_format = 'keras_zip'
    weights.keras_version = keras_version
    weights.model_config = config
    return weights


def _check_zip_members(path: Path, members: Iterable[zipfile.ZipInfo]) -> None:
    """Refuse path-traversal names (a sign of a hostile archive; we never extract) and zip bombs.

    zipfile stops at a member's declared `file_size`, so capping the declared size caps what is inflated.
    """
    for info in members:
        name = info.filename
        if name.startswith(('/', '\\')) or '..' in re.split(r'[/\\]', name) or re.match(r'^[A-Za-z]:', name):
            raise KerasFileError(f'{path}: archive member {name!r} points outside the archive; refusing it')
        cap = MAX_ZIP_MEMBER_BYTES.get(name)
        if cap is not None and info.file_size > cap:
            raise KerasFileError(f'{path}: archive member {name} declares {info.file_size} bytes uncompressed '
                                 f'({info.compress_size} compressed), over the {cap}-byte limit (zip bomb?)')


# --- TensorFlow.js layers model ---

def _read_tfjs(path: Path) -> KerasWeights:
    layers, source, keras_version, model_config = read_tfjs_layers(path)
    return KerasWeights(layers, source, 'tfjs_layers', keras_version, model_config)


# --- live model ---

def _read_live_model(model: Any) -> KerasWeights:
    if not hasattr(model, 'layers') or not hasattr(model, 'get_weights'):
        raise KerasFileError(f'expected a path or a keras.Model, got {type(model).__name__}')
    from .runtime import import_keras

    keras = import_keras()  # already imported by whoever built `model`

    source = f'keras.Model {model.name!r}'
    layers: LayerWeights = {}
    for layer in _flat_layers(model):
        for variable in layer.weights:
            var = variable.name.split('/')[-1].split(':')[0]
            _add(layers, source, layer.name, var, _as_float32(np.asarray(variable.numpy()), source, layer.name, var))
    model_config = None
    if type(model).__name__ in ('Functional', 'Sequential'):  # a subclassed model has no config: weights only
        # through JSON, as a saved file has it: tuples become lists
        model_config = json.loads(json.dumps({'class_name': type(model).__name__, 'config': model.get_config()},
                                             default=str))
    return KerasWeights(layers, source, 'live_model', keras.__version__, model_config)


def _flat_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        if hasattr(layer, 'layers') and layer.layers:
            yield from _flat_layers(layer)
        else:
            yield layer


# --- shared ---

def _add(layers: LayerWeights, source: str, layer: str, var: str, value: np.ndarray) -> None:
    layer_vars = layers.setdefault(layer, {})
    if var in layer_vars:
        raise KerasFileError(f'{source}: layer {layer!r} variable {var!r} appears twice')
    layer_vars[var] = value


def _read_dataset(dataset: Any, source: str, layer: str, var: str) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset):
        raise KerasFileError(f'{source}: layer {layer!r} variable {var!r} is not a dataset')
    return _as_float32(dataset[()], source, layer, var)


def _as_float32(value: np.ndarray, source: str, layer: str, var: str) -> np.ndarray:
    """float16/32/64 become float32 (exact for 16, rounded for 64); anything else is not a weight, except the sample
    counter of an adapted Normalization layer (`count`, an integer), which is not used."""
    value = np.asarray(value)
    if value.dtype.kind in 'iu' and var == 'count' and value.size == 1:
        return value.astype(np.float32)
    if value.dtype.kind != 'f':
        raise KerasFileError(f'{source}: layer {layer!r} variable {var!r} has dtype {value.dtype}; '
                             'expected floating point weights')
    return value.astype(np.float32, copy=False)
