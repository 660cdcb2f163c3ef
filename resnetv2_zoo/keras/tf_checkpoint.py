"""Read Keras 2 weights in TensorFlow's own formats, without TensorFlow: TF2 checkpoints and SavedModel directories.

Before Keras 3, `model.save_weights('cp.ckpt')`, `ModelCheckpoint(..., save_weights_only=True)` and
`model.save('my_model')` wrote TensorFlow's tensor bundle, not HDF5:

* `cp.ckpt.index`: a LevelDB SSTable (sorted key -> value blocks, a footer with magic 0xdb4775248b80fb57,
  each block followed by a type byte and a masked crc32c) mapping each tensor key to a `BundleEntryProto`
  (dtype, shape, shard, offset, size, masked crc32c of the bytes); the empty key holds the `BundleHeaderProto`.
* `cp.ckpt.data-0000K-of-0000N`: the raw tensor bytes.
* `_CHECKPOINTABLE_OBJECT_GRAPH`, a string tensor in the bundle: the `TrackableObjectGraph` of what was saved.
  For a Keras model the root's children are `layer_with_weights-K` (and `layer-J`), each layer's children its
  variables, and each variable node names its tensor: `full_name` `conv1_conv/kernel` (the layer's name and
  the variable's) and `checkpoint_key` `layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`.
* A SavedModel directory holds the same bundle as `variables/variables`, plus `keras_metadata.pb`
  (`SavedMetadata`: per saved Keras object its path, class and JSON config) and `saved_model.pb`.

Weights are mapped by the layer names in `full_name`, never by the `layer_with_weights-K` order. A model
nested in another (a base ResNetV2 and a new `Dense` head) is accepted when the file proves its structure,
and its `Dense` becomes the classifier `predictions`. Everything is parsed by hand (protobuf varints and
length-delimited fields, the SSTable blocks) with every size checked against the file before anything is
read, and every checksum verified: crc32c is computed here, vectorized with numpy (`crc32c`).
"""
import functools
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import KerasFileError
from .files import MAX_TENSOR_BYTES, MAX_TOTAL_BYTES, KerasWeights, LayerWeights, _add, _as_float32
from .safe_json import load_json

PathLike = Union[str, os.PathLike]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_BYTES = 5  # compression type byte + masked crc32c
OBJECT_GRAPH_KEY = b'_CHECKPOINTABLE_OBJECT_GRAPH'
VARIABLE_VALUE = 'VARIABLE_VALUE'
# Caps checked before reading. A ResNet152V2 checkpoint's index is ~50 KB (with optimizer slots), its object
# graph ~1 MB in a SavedModel, keras_metadata.pb ~2 MB; the caps leave a wide margin.
MAX_INDEX_BYTES = 64 << 20
MAX_OBJECT_GRAPH_BYTES = 64 << 20
MAX_METADATA_BYTES = 256 << 20
MAX_CHECKPOINT_FILE_BYTES = 1 << 20  # the `checkpoint` text file
MAX_SHARDS = 1 << 16
MAX_RANK = 8
MAX_GRAPH_DEPTH = 32  # models nested in models
RESNETV2_BN_EPSILON = 1.001e-5

# tensorflow/core/framework/types.proto
FLOAT_DTYPES = {1: 'f4', 2: 'f8', 19: 'f2', 14: 'bfloat16'}
DT_STRING = 7
DTYPE_NAMES = {1: 'float32', 2: 'float64', 3: 'int32', 4: 'uint8', 5: 'int16', 6: 'int8', 7: 'string', 8: 'complex64',
               9: 'int64', 10: 'bool', 14: 'bfloat16', 17: 'uint16', 18: 'complex128', 19: 'float16',
               20: 'resource', 21: 'variant', 22: 'uint32', 23: 'uint64'}

_LAYER_CHILD_RE = re.compile(r'layer_with_weights-(\d+)')
_ANY_LAYER_CHILD_RE = re.compile(r'layer-(\d+)')


# --- crc32c (Castagnoli), vectorized ---
#
# A byte-at-a-time CRC in Python runs at ~10 MB/s. Here the input is cut into M chunks of W 4-byte words,
# the CRC of all chunks advances one word per numpy step (two 64K-entry tables consume 32 bits at a time),
# and the chunk CRCs are merged pairwise as zlib's crc32_combine does: CRC(a || b) = Z_len(b)(CRC(a)) ^ CRC(b),
# where Z_n, "feed n zero bytes", is linear over GF(2) and applied through four 256-entry tables. The CRC is
# computed with a zero register (leading zero bytes then change nothing, so the input is padded at the front),
# and the standard initial register 0xFFFFFFFF is XORed into the first four data bytes instead.

CRC32C_POLY = 0x82F63B78  # reflected


def _feed_zero_bytes(register: np.ndarray, count: int) -> np.ndarray:
    for _ in range(count):
        register = _CRC_TABLE[register & 0xFF] ^ (register >> 8)
    return register


def _make_crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(CRC32C_POLY), table >> 1).astype(np.uint32)
    return table


_CRC_TABLE = _make_crc_table()
_LOW16 = np.arange(1 << 16, dtype=np.uint32)
_WORD_TABLE_LO = _feed_zero_bytes(_LOW16, 4)  # a 32-bit step: register' = LO[r & 0xffff] ^ HI[r >> 16]
_WORD_TABLE_HI = _feed_zero_bytes(_LOW16 << 16, 4)
_BASIS = np.uint32(1) << np.arange(32, dtype=np.uint32)


def _tables_from_images(images: np.ndarray) -> np.ndarray:
    """(4, 256) tables of the linear map sending bit i to images[i], one table per byte of the register."""
    tables = []
    for byte in range(4):
        table = np.zeros(1, dtype=np.uint32)
        for bit in range(8):
            table = np.concatenate([table, table ^ images[8 * byte + bit]])
        tables.append(table)
    return np.stack(tables)


def _apply(tables: np.ndarray, register: np.ndarray) -> np.ndarray:
    return (tables[0][register & 0xFF] ^ tables[1][(register >> 8) & 0xFF]
            ^ tables[2][(register >> 16) & 0xFF] ^ tables[3][register >> 24])


@functools.lru_cache(maxsize=64)
def _zeros_operator(log2_bytes: int) -> np.ndarray:
    """Tables of Z_n for n = 2**log2_bytes zero bytes, by repeated squaring."""
    if log2_bytes == 0:
        return _tables_from_images(_feed_zero_bytes(_BASIS, 1))
    half = _zeros_operator(log2_bytes - 1)
    return _tables_from_images(_apply(half, _apply(half, _BASIS)))


def crc32c(data: Union[bytes, bytearray, memoryview, np.ndarray]) -> int:
    """CRC-32C (Castagnoli, as in iSCSI, LevelDB and TensorFlow) of `data`; ~100 MB/s and more."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    size = buf.size
    if size < 4:
        register = 0xFFFFFFFF
        for byte in buf.tolist():
            register = int(_CRC_TABLE[(register ^ byte) & 0xFF]) ^ (register >> 8)
        return register ^ 0xFFFFFFFF
    words = -(-size // 4)
    log2_chunk_words = max(0, min(12, round(np.log2(max(1.0, np.sqrt(words / 8))))))
    chunk_words = 1 << log2_chunk_words
    chunks = -(-words // chunk_words)
    padded = np.zeros(chunks * chunk_words * 4, dtype=np.uint8)
    pad = padded.size - size
    padded[pad:] = buf
    padded[pad:pad + 4] ^= 0xFF  # the initial register 0xFFFFFFFF
    matrix = padded.view('<u4').reshape(chunks, chunk_words)
    register = np.zeros(chunks, dtype=np.uint32)
    for column in range(chunk_words):
        word = register ^ matrix[:, column]
        register = _WORD_TABLE_LO[word & 0xFFFF] ^ _WORD_TABLE_HI[word >> 16]
    log2_bytes = log2_chunk_words + 2
    while register.size > 1:
        if register.size % 2:  # a chunk of zeros in front: no effect on a zero-register CRC
            register = np.concatenate([np.zeros(1, dtype=np.uint32), register])
        register = _apply(_zeros_operator(log2_bytes), register[0::2]) ^ register[1::2]
        log2_bytes += 1
    return int(register[0]) ^ 0xFFFFFFFF


def masked_crc32c(crc: int) -> int:
    """LevelDB's and TensorFlow's stored form of a CRC (rotated and offset, so a CRC of CRCs is not trivial)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format ---

Fields = Dict[int, List[Union[int, bytes]]]


def _varint(buf: bytes, pos: int, what: str) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise KerasFileError(f'{what}: truncated or overlong varint')
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7


def _fields(buf: bytes, what: str) -> Fields:
    """One message's fields: varints and fixed as int, length-delimited as bytes (sub-messages parsed on demand)."""
    fields: Fields = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, what)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos, what)
        elif wire_type == 2:
            length, pos = _varint(buf, pos, what)
            if pos + length > len(buf):
                raise KerasFileError(f'{what}: field {number} declares {length} bytes, only {len(buf) - pos} remain')
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if pos + width > len(buf):
                raise KerasFileError(f'{what}: truncated fixed-width field {number}')
            value, pos = int.from_bytes(buf[pos:pos + width], 'little'), pos + width
        else:
            raise KerasFileError(f'{what}: unsupported protobuf wire type {wire_type} (field {number}); corrupt')
        fields.setdefault(number, []).append(value)
    return fields


def _int(fields: Fields, number: int, default: int = 0, signed: bool = True) -> int:
    value = fields.get(number, [default])[-1]
    if not isinstance(value, int):
        raise KerasFileError(f'protobuf field {number}: expected an integer')
    return value - (1 << 64) if signed and value >= 1 << 63 else value


def _bytes(fields: Fields, number: int) -> bytes:
    value = fields.get(number, [b''])[-1]
    if not isinstance(value, bytes):
        raise KerasFileError(f'protobuf field {number}: expected a length-delimited value')
    return value


def _str(fields: Fields, number: int) -> str:
    return _bytes(fields, number).decode('utf8', errors='replace')


# --- the index: a LevelDB SSTable ---

def _read_table(path: Path, source: str) -> Dict[bytes, bytes]:
    """All key -> value pairs of the SSTable at `path`, every block's checksum verified."""
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise KerasFileError(f'{source}: {path.name} is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit '
                             'for a checkpoint index')
    data = path.read_bytes()
    if len(data) < FOOTER_BYTES or int.from_bytes(data[-8:], 'little') != TABLE_MAGIC:
        raise KerasFileError(f'{source}: {path.name} is not a TensorFlow checkpoint index (no SSTable footer magic; '
                             f'{len(data)} bytes): truncated or another kind of file')
    what = f'{source}: {path.name} footer'
    _, pos = _varint(data, len(data) - FOOTER_BYTES, what)  # metaindex handle: unused by TensorFlow bundles
    _, pos = _varint(data, pos, what)
    index_offset, pos = _varint(data, pos, what)
    index_size, _ = _varint(data, pos, what)
    table: Dict[bytes, bytes] = {}
    for _, handle in _block_entries(_block(data, index_offset, index_size, path, source), path, source):
        offset, pos = _varint(handle, 0, f'{source}: {path.name} index block')
        block_size, _ = _varint(handle, pos, f'{source}: {path.name} index block')
        for key, value in _block_entries(_block(data, offset, block_size, path, source), path, source):
            if key in table:
                raise KerasFileError(f'{source}: {path.name} lists tensor {key!r} twice; corrupt')
            table[key] = value
    return table


def _block(data: bytes, offset: int, size: int, path: Path, source: str) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_BYTES > len(data) - FOOTER_BYTES:
        raise KerasFileError(f'{source}: {path.name} points to a block at bytes {offset}-{end}, past the end of the '
                             f'file ({len(data)} bytes); truncated or corrupt')
    contents, kind = data[offset:end], data[end]
    stored = int.from_bytes(data[end + 1:end + BLOCK_TRAILER_BYTES], 'little')
    if masked_crc32c(crc32c(data[offset:end + 1])) != stored:
        raise KerasFileError(f'{source}: {path.name}: crc32c mismatch in the block at byte {offset}; corrupt')
    if kind != 0:
        raise KerasFileError(f'{source}: {path.name} has a compressed block (type {kind}); TensorFlow writes '
                             'checkpoint indexes uncompressed, so this is not one')
    return contents


def _block_entries(block: bytes, path: Path, source: str) -> Iterator[Tuple[bytes, bytes]]:
    """Prefix-compressed entries: shared key length, unshared length, value length, key suffix, value."""
    what = f'{source}: {path.name} block'
    if len(block) < 4:
        raise KerasFileError(f'{what}: too short')
    restarts = int.from_bytes(block[-4:], 'little')
    entries_end = len(block) - 4 - 4 * restarts
    if restarts < 1 or entries_end < 0:
        raise KerasFileError(f'{what}: {restarts} restart points do not fit in {len(block)} bytes; corrupt')
    pos, key = 0, b''
    while pos < entries_end:
        shared, pos = _varint(block, pos, what)
        unshared, pos = _varint(block, pos, what)
        value_size, pos = _varint(block, pos, what)
        if shared > len(key) or pos + unshared + value_size > entries_end:
            raise KerasFileError(f'{what}: an entry overruns its block; corrupt')
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_size]
        pos += value_size


# --- the tensor bundle ---

@dataclass
class _Entry:
    key: str
    dtype: int
    shape: Tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int  # masked


class _Bundle:
    """A tensor bundle (`prefix.index` + `prefix.data-*`): entries from the index, tensors read on demand."""

    def __init__(self, prefix: Path, source: str):
        self.prefix, self.source = prefix, source
        index = Path(f'{prefix}.index')
        table = _read_table(index, source)
        if b'' not in table:
            raise KerasFileError(f'{source}: {index.name} has no bundle header; not a TensorFlow checkpoint index')
        header = _fields(table.pop(b''), f'{source}: bundle header')
        self.num_shards = _int(header, 1, default=1)
        if not 1 <= self.num_shards <= MAX_SHARDS:
            raise KerasFileError(f'{source}: the bundle header declares {self.num_shards} data shards; corrupt')
        self.byte_order = '>' if _int(header, 2) == 1 else '<'
        self.entries = {key.decode('utf8', errors='replace'): self._entry(key, value) for key, value in table.items()}
        self._shard_sizes: Dict[int, int] = {}
        self.bytes_read = 0
        self.labels: Dict[str, str] = {}  # tensor key -> what it is (`conv1_conv/kernel`), for messages

    def _what(self, entry: '_Entry') -> str:
        label = self.labels.get(entry.key)
        return f'{self.source}: tensor {entry.key!r}' + (f' ({label})' if label else '')

    def _entry(self, key: bytes, value: bytes) -> _Entry:
        name = key.decode('utf8', errors='replace')
        what = f'{self.source}: tensor {name!r}'
        fields = _fields(value, what)
        dims = []
        for dim in _fields(_bytes(fields, 2), what).get(2, []):
            if not isinstance(dim, bytes):
                raise KerasFileError(f'{what}: malformed shape')
            dims.append(_int(_fields(dim, what), 1))
        if fields.get(7):
            raise KerasFileError(f'{what} is a partitioned (sliced) variable; Keras ResNetV2 weights never are')
        return _Entry(name, _int(fields, 1), tuple(dims), _int(fields, 3), _int(fields, 4), _int(fields, 5),
                      _int(fields, 6, signed=False))

    def shard_path(self, shard: int) -> Path:
        return Path(f'{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}')

    def _check_span(self, entry: _Entry) -> Path:
        """Refuse an entry whose bytes are not all in its shard, before reading anything."""
        what = self._what(entry)
        if not 0 <= entry.shard < self.num_shards:
            raise KerasFileError(f'{what} is in data shard {entry.shard}, but the bundle has {self.num_shards}')
        path = self.shard_path(entry.shard)
        if entry.shard not in self._shard_sizes:
            if not path.is_file():
                raise KerasFileError(f'{what}: data shard {path.name} is missing (next to {self.prefix.name}.index)')
            self._shard_sizes[entry.shard] = path.stat().st_size
        shard_size = self._shard_sizes[entry.shard]
        if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > shard_size:
            raise KerasFileError(f'{what}: its {entry.size} bytes at offset {entry.offset} lie past the end of '
                                 f'{path.name} ({shard_size} bytes); the shard is truncated or the index corrupt')
        if entry.size > MAX_TENSOR_BYTES or self.bytes_read + entry.size > MAX_TOTAL_BYTES:
            raise KerasFileError(f'{what} declares {entry.size} bytes ({self.bytes_read} read so far); a ResNetV2 '
                                 f'tensor is at most {MAX_TENSOR_BYTES} bytes and a checkpoint {MAX_TOTAL_BYTES}')
        return path

    def _read_bytes(self, entry: _Entry) -> np.ndarray:
        path = self._check_span(entry)
        buf = np.empty(entry.size, dtype=np.uint8)
        with open(path, 'rb') as f:
            f.seek(entry.offset)
            if f.readinto(memoryview(buf)) != entry.size:
                raise KerasFileError(f'{self._what(entry)}: {path.name} ended early; truncated')
        self.bytes_read += entry.size
        return buf

    def _check_crc(self, entry: _Entry, crc: int) -> None:
        if masked_crc32c(crc) != entry.crc:
            raise KerasFileError(f'{self._what(entry)}: crc32c mismatch in '
                                 f'{self.shard_path(entry.shard).name}; the file is corrupt')

    def read_array(self, key: str) -> np.ndarray:
        """A float tensor, checksum verified; any other dtype is refused."""
        entry = self.entries[key]
        what = self._what(entry)
        if entry.dtype not in FLOAT_DTYPES:
            raise KerasFileError(f'{what} has dtype {DTYPE_NAMES.get(entry.dtype, entry.dtype)}; '
                                 'expected floating point weights')
        if len(entry.shape) > MAX_RANK or any(d < 0 for d in entry.shape):
            raise KerasFileError(f'{what} has shape {entry.shape}; corrupt')
        code = FLOAT_DTYPES[entry.dtype]
        itemsize = 2 if code == 'bfloat16' else int(code[1])
        count = 1
        for dim in entry.shape:
            count *= dim
            if count * itemsize > MAX_TENSOR_BYTES:
                raise KerasFileError(f'{what} declares shape {entry.shape}, over {MAX_TENSOR_BYTES} bytes')
        if count * itemsize != entry.size:
            raise KerasFileError(f'{what}: shape {entry.shape} of {DTYPE_NAMES[entry.dtype]} needs '
                                 f'{count * itemsize} bytes, the index says {entry.size}; corrupt')
        buf = self._read_bytes(entry)
        self._check_crc(entry, crc32c(buf))
        if code == 'bfloat16':  # the top half of a float32: exact
            halves = buf.view(f'{self.byte_order}u2').astype(np.uint32) << 16
            return halves.view(np.float32).reshape(entry.shape)
        return buf.view(f'{self.byte_order}{code}').reshape(entry.shape)

    def read_string(self, key: str, max_bytes: int) -> bytes:
        """A scalar string tensor: varint length, masked crc32c of the length, the bytes."""
        entry = self.entries[key]
        what = self._what(entry)
        if entry.dtype != DT_STRING or entry.shape != ():
            raise KerasFileError(f'{what}: expected a scalar string, found {DTYPE_NAMES.get(entry.dtype)} '
                                 f'{entry.shape}')
        if entry.size > max_bytes:
            raise KerasFileError(f'{what} is {entry.size} bytes, over the {max_bytes}-byte limit')
        buf = self._read_bytes(entry).tobytes()
        length, pos = _varint(buf, 0, what)
        if pos + 4 + length != len(buf):
            raise KerasFileError(f'{what}: string of {length} bytes does not fill its {len(buf)}-byte entry; corrupt')
        # TensorFlow checksums the length as a uint32 (not its varint), then the stored length checksum, the bytes.
        value = buf[pos + 4:]
        self._check_crc(entry, crc32c(struct.pack('<I', length & 0xFFFFFFFF) + buf[pos:]))
        return value


# --- finding the files ---

@dataclass
class TFFormat:
    """A TensorFlow-format Keras source, resolved from what the user named."""

    kind: str  # 'tf_checkpoint' or 'saved_model'
    given: Path  # what was named: the prefix, its .index, the folder with `checkpoint`, the SavedModel dir
    prefix: Path  # the bundle prefix (`.../cp.ckpt`, `.../variables/variables`)
    directory: Optional[Path] = None  # the SavedModel directory

    def files(self) -> List[Path]:
        """The files the weights come from, in a fixed order (for the source hash)."""
        names = [Path(f'{self.prefix}.index')]
        names += sorted(p for p in self.prefix.parent.iterdir() if p.name.startswith(f'{self.prefix.name}.data-'))
        if self.directory is not None:
            names += [p for p in (self.directory / 'saved_model.pb', self.directory / 'keras_metadata.pb')
                      if p.is_file()]
        return names

    def hexdigest(self) -> str:
        """SHA-256 of `files()` read one after another."""
        digest = hashlib.sha256()
        for path in self.files():
            with open(path, 'rb') as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b''):
                    digest.update(chunk)
        return digest.hexdigest()


def find_tf_format(path: PathLike) -> Optional[TFFormat]:
    """`path` as a SavedModel directory, a checkpoint folder, prefix, `.index` or `.data-*` file; else None."""
    path = Path(path)
    if path.is_dir():
        if (path / 'saved_model.pb').is_file() or (path / 'saved_model.pbtxt').is_file():
            if not (path / 'saved_model.pb').is_file():
                raise KerasFileError(f'{path} is a SavedModel in text form (saved_model.pbtxt); '
                                     'save it with model.save() for the binary form')
            return TFFormat('saved_model', path, path / 'variables' / 'variables', path)
        if (path / 'checkpoint').is_file():
            return TFFormat('tf_checkpoint', path, _latest_checkpoint(path))
        indexes = sorted(p.name for p in path.iterdir() if p.name.endswith('.index') and p.is_file())
        if indexes:
            raise KerasFileError(f'{path} holds TF checkpoints ({", ".join(indexes[:5])}) but no `checkpoint` file '
                                 'saying which is the latest; name one by its prefix (e.g. '
                                 f'{path / indexes[0][:-len(".index")]})')
        return None
    if path.suffix == '.index' and path.is_file():
        return TFFormat('tf_checkpoint', path, path.with_suffix(''))
    match = re.fullmatch(r'(.*)\.data-\d{5}-of-\d{5}', path.name)
    if match and path.is_file():
        return TFFormat('tf_checkpoint', path, path.with_name(match[1]))
    if not path.exists() and Path(f'{path}.index').is_file():
        return TFFormat('tf_checkpoint', path, path)
    return None


def _latest_checkpoint(folder: Path) -> Path:
    """The `model_checkpoint_path` of the folder's `checkpoint` file (a CheckpointState text proto)."""
    state = folder / 'checkpoint'
    if state.stat().st_size > MAX_CHECKPOINT_FILE_BYTES:
        raise KerasFileError(f'{state} is {state.stat().st_size} bytes; not a TensorFlow `checkpoint` file')
    text = state.read_bytes().decode('utf8', errors='replace')
    match = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if match is None:
        raise KerasFileError(f'{state} names no model_checkpoint_path; expected the `checkpoint` file TensorFlow '
                             'writes next to cp.ckpt.index')
    name = re.sub(r'\\(.)', r'\1', match[1])
    prefix = Path(name) if Path(name).is_absolute() else folder / name
    if not Path(f'{prefix}.index').is_file() and (folder / f'{Path(name).name}.index').is_file():
        prefix = folder / Path(name).name  # the folder was moved since: TensorFlow looks next to `checkpoint` too
    if not Path(f'{prefix}.index').is_file():
        raise KerasFileError(f'{state} names the checkpoint {name!r}, but {prefix}.index does not exist')
    return prefix


# --- the Keras model in the object graph ---

@dataclass
class _Node:
    children: List[Tuple[int, str]]
    variable: Optional[Tuple[str, str]] = None  # (full_name, checkpoint_key) of a variable node


@dataclass
class _Layer:
    index: int  # K of layer_with_weights-K
    position: Optional[int]  # J of layer-J, the index in model.layers
    node: int
    name: str = ''
    variables: Dict[str, str] = field(default_factory=dict)  # var -> checkpoint key
    sublayers: Optional[List['_Layer']] = None  # a nested model's weight layers


def _object_graph(bundle: _Bundle, source: str) -> List[_Node]:
    if OBJECT_GRAPH_KEY.decode() not in bundle.entries:
        raise KerasFileError(f'{source}: the checkpoint has no object graph ({OBJECT_GRAPH_KEY.decode()}): it was '
                             'written by TensorFlow 1 (tf.compat.v1.train.Saver), which Keras 2 did not use')
    bundle.labels[OBJECT_GRAPH_KEY.decode()] = 'the object graph'
    raw = bundle.read_string(OBJECT_GRAPH_KEY.decode(), MAX_OBJECT_GRAPH_BYTES)
    what = f'{source}: object graph'
    nodes = []
    for node in _fields(raw, what).get(1, []):
        node_fields = _fields(node, what) if isinstance(node, bytes) else {}
        children = []
        for ref in node_fields.get(1, []):
            ref_fields = _fields(ref, what) if isinstance(ref, bytes) else {}
            children.append((_int(ref_fields, 1), _str(ref_fields, 2)))
        variable = None
        for attribute in node_fields.get(2, []):
            attr_fields = _fields(attribute, what) if isinstance(attribute, bytes) else {}
            if _str(attr_fields, 1) == VARIABLE_VALUE:
                variable = (_str(attr_fields, 2), _str(attr_fields, 3))
        nodes.append(_Node(children, variable))
    if not nodes:
        raise KerasFileError(f'{what} is empty')
    for node in nodes:
        for child, name in node.children:
            if not 0 <= child < len(nodes):
                raise KerasFileError(f'{what}: child {name!r} refers to node {child} of {len(nodes)}; corrupt')
    return nodes


def _is_keras_model(node: _Node) -> bool:
    return any(_LAYER_CHILD_RE.fullmatch(name) for _, name in node.children)


def _find_model(nodes: List[_Node], source: str) -> int:
    """The Keras model's node: the root, or the one Keras model a `tf.train.Checkpoint(model=...)` holds."""
    if _is_keras_model(nodes[0]):
        return 0
    models = [(name, child) for child, name in nodes[0].children if _is_keras_model(nodes[child])]
    if len(models) == 1:
        return models[0][1]
    found = sorted({name for _, name in nodes[0].children})
    if not models:
        raise KerasFileError(f'{source}: not a Keras model checkpoint: its root object has no Keras layers '
                             f'(layer_with_weights-N); it holds {found[:12]}')
    raise KerasFileError(f'{source}: holds {len(models)} Keras models ({[n for n, _ in models]}); expected one')


def _model_layers(nodes: List[_Node], model: int, source: str, depth: int = 0,
                  seen: Optional[set] = None) -> List[_Layer]:
    """The weight layers of a Keras model node, in layer_with_weights order, nested models expanded.

    Each node is visited once: a layer reached twice (a cycle, or a graph built to blow up) is refused.
    """
    seen = {model} if seen is None else seen
    if depth > MAX_GRAPH_DEPTH:
        raise KerasFileError(f'{source}: models nested more than {MAX_GRAPH_DEPTH} deep; corrupt')
    positions = {}
    for child, name in nodes[model].children:
        match = _ANY_LAYER_CHILD_RE.fullmatch(name)
        if match:
            positions[child] = int(match[1])
    layers: Dict[int, _Layer] = {}
    for child, name in nodes[model].children:
        match = _LAYER_CHILD_RE.fullmatch(name)
        if not match:
            continue
        if child in seen or int(match[1]) in layers:
            raise KerasFileError(f'{source}: object graph: layer {name!r} (node {child}) is reached twice; '
                                 'a Keras model shares no layers between models')
        seen.add(child)
        layers[int(match[1])] = _Layer(int(match[1]), positions.get(child), child)
    result = []
    for _, layer in sorted(layers.items()):
        if _is_keras_model(nodes[layer.node]):
            layer.sublayers = _model_layers(nodes, layer.node, source, depth + 1, seen)
        else:
            _name_layer(nodes, layer, source)
        result.append(layer)
    return result


def _name_layer(nodes: List[_Node], layer: _Layer, source: str) -> None:
    """The layer's name and variables from its variables' `full_name` (`conv1_conv/kernel`)."""
    names = set()
    for child, _ in nodes[layer.node].children:
        variable = nodes[child].variable
        if variable is None:
            continue
        full_name, key = variable
        parts = full_name.split(':')[0].split('/')
        if len(parts) < 2 or not parts[-2]:
            raise KerasFileError(f'{source}: variable {key!r} has no layer name (full_name {full_name!r}); '
                                 'it was not written by a Keras layer')
        names.add(parts[-2])
        if parts[-1] in layer.variables:
            raise KerasFileError(f'{source}: layer {parts[-2]!r} variable {parts[-1]!r} appears twice')
        layer.variables[parts[-1]] = key
    if len(names) > 1:
        raise KerasFileError(f'{source}: the variables of one layer name different layers: {sorted(names)}')
    layer.name = names.pop() if names else ''


# --- SavedModel's keras_metadata.pb ---

def _keras_metadata(directory: Path, source: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """node_path (`root.layer_with_weights-0`) -> the node's JSON metadata; None when the file is absent."""
    path = directory / 'keras_metadata.pb'
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise KerasFileError(f'{source}: keras_metadata.pb is over the {MAX_METADATA_BYTES}-byte limit')
    what = f'{source}: keras_metadata.pb'
    metadata = {}
    for node in _fields(path.read_bytes(), what).get(1, []):
        node_fields = _fields(node, what) if isinstance(node, bytes) else {}
        value = load_json(_bytes(node_fields, 5) or b'{}', f'{what}: the metadata of {_str(node_fields, 3)!r}')
        if isinstance(value, dict):
            metadata[_str(node_fields, 3)] = value
    return metadata


def _dict(value: Any) -> Dict[str, Any]:
    """`value` if a JSON object, else empty: metadata of an unexpected shape then fails the structure checks."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> List[Dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _config(metadata: Dict[str, Any]) -> Dict[str, Any]:
    return _dict(metadata.get('config'))


def _layer_name(layer_config: Dict[str, Any]) -> Any:
    return _config(layer_config).get('name', layer_config.get('name'))


def _check_metadata(metadata: Dict[str, Dict[str, Any]], model_path: str, layers: List[_Layer], source: str) -> None:
    """Layer names and BatchNorm epsilons from keras_metadata.pb agree with what the variables say."""
    for layer in layers:
        path = f'{model_path}.layer_with_weights-{layer.index}'
        node = metadata.get(path, {})
        if layer.sublayers is not None:
            _check_metadata(metadata, path, layer.sublayers, source)
            continue
        name = node.get('name')
        if name is not None and layer.name and name != layer.name:
            raise KerasFileError(f'{source}: keras_metadata.pb names layer {path} {name!r}, but its variables '
                                 f'are named {layer.name!r}; inconsistent')
        epsilon = _config(node).get('epsilon')
        if node.get('class_name') == 'BatchNormalization' and epsilon != RESNETV2_BN_EPSILON:
            raise KerasFileError(f'{source}: layer {layer.name!r} is a BatchNormalization with epsilon {epsilon}; '
                                 f'Keras ResNetV2 uses {RESNETV2_BN_EPSILON}, so it cannot be converted exactly')


# --- nested models: a base and a Dense head ---

def _resolve_nested(layers: List[_Layer], metadata: Optional[Dict[str, Dict[str, Any]]], model_path: str,
                    source: str) -> List[_Layer]:
    """A base ResNetV2 without top + global average pooling + one Dense: the base's layers, the Dense as
    `predictions`. Anything else nested is refused."""
    fix = ('; to convert it, save the model with include_top=True (its classifier is then named "predictions") '
           'or name the head Dense "predictions" in a flat model, or save it as a .keras file')
    shape = ', '.join(f'{layer.name or "?"} ({"model" if layer.sublayers is not None else "layer"})'
                      for layer in layers)
    if (len(layers) != 2 or layers[0].sublayers is None or layers[1].sublayers is not None
            or any(sub.sublayers is not None for sub in layers[0].sublayers)):
        raise KerasFileError(f'{source}: a nested model with weight layers [{shape}], not a ResNetV2 base '
                             f'followed by one Dense layer{fix}')
    base, head = layers
    if any(sub.name == 'predictions' for sub in base.sublayers):
        raise KerasFileError(f'{source}: a nested model whose base already has its classifier "predictions" and '
                             f'a second head {head.name!r}{fix}')
    if set(head.variables) - {'kernel', 'bias'} or 'kernel' not in head.variables:
        raise KerasFileError(f'{source}: the head {head.name!r} after the nested base has variables '
                             f'{sorted(head.variables)}, not those of a Dense layer{fix}')
    if base.position is not None and head.position is not None and head.position < base.position:
        raise KerasFileError(f'{source}: the layer {head.name!r} comes before the nested base{fix}')
    if metadata is not None:
        _check_nested_metadata(metadata, model_path, base, head, source, fix)
    renamed = _Layer(head.index, head.position, head.node, 'predictions', head.variables)
    return [*base.sublayers, renamed]


def _check_nested_metadata(metadata: Dict[str, Dict[str, Any]], model_path: str, base: _Layer, head: _Layer,
                           source: str, fix: str) -> None:
    """keras_metadata.pb proves the path: base -> [GlobalAveragePooling2D] -> Dropout* -> Dense, one chain."""
    config = _config(metadata.get(model_path, {}))
    base_meta = metadata.get(f'{model_path}.layer_with_weights-{base.index}', {})
    head_meta = metadata.get(f'{model_path}.layer_with_weights-{head.index}', {})
    if head_meta.get('class_name') != 'Dense':
        raise KerasFileError(f'{source}: the layer after the nested base is a {head_meta.get("class_name")}, '
                             f'not a Dense{fix}')
    base_classes = [c.get('class_name') for c in _list(_config(base_meta).get('layers'))]
    if any(cls in ('GlobalMaxPooling2D', 'Dense', 'Flatten') for cls in base_classes):
        raise KerasFileError(f'{source}: the nested base {base_meta.get("name")!r} ends with max pooling, Flatten '
                             f'or a Dense layer{fix}')
    chain = [c for c in _list(config.get('layers')) if c.get('class_name') != 'InputLayer']
    names = [_layer_name(c) for c in chain]
    kinds = [str(c.get('class_name')) for c in chain]
    ok = (len(chain) >= 2 and names[0] == base_meta.get('name') and names[-1] == head_meta.get('name')
          and all(k in ('GlobalAveragePooling2D', 'Dropout') for k in kinds[1:-1])
          and kinds.count('GlobalAveragePooling2D') == (0 if 'GlobalAveragePooling2D' in base_classes else 1)
          and not any(_config(c).get('keepdims') for c in chain[1:-1]))
    if ok and 'output_layers' in config:  # a Functional model: each layer takes the previous one's output
        for previous, layer in zip(names, chain[1:]):
            ok = ok and re.findall(r'\[\s*"([^"]+)"', json.dumps(layer.get('inbound_nodes', []))) == [previous]
    if not ok:
        raise KerasFileError(f'{source}: the nested model is {" -> ".join(kinds)}, not a ResNetV2 base, '
                             f'global average pooling and a Dense{fix}')


# --- reading ---

def read_tf_weights(tf_format: TFFormat) -> KerasWeights:
    """The weights of a Keras 2 TF checkpoint or SavedModel, by layer name, every checksum verified."""
    source = str(tf_format.given)
    if tf_format.kind == 'saved_model' and not Path(f'{tf_format.prefix}.index').is_file():
        raise KerasFileError(f'{source}: a SavedModel without variables/variables.index; it has no weights to read')
    bundle = _Bundle(tf_format.prefix, source)
    nodes = _object_graph(bundle, source)
    model = _find_model(nodes, source)
    layers = _model_layers(nodes, model, source)
    metadata = _keras_metadata(tf_format.directory, source) if tf_format.directory is not None else None
    keras_version = 'unknown'
    if metadata is not None and model == 0:
        _check_metadata(metadata, 'root', layers, source)
        keras_version = str(metadata.get('root', {}).get('keras_version', 'unknown'))
    if any(layer.sublayers is not None for layer in layers):
        layers = _resolve_nested(layers, metadata if model == 0 else None, 'root', source)
    weights: LayerWeights = {}
    bundle.labels.update({key: f'{layer.name}/{var}' for layer in layers for var, key in layer.variables.items()})
    for layer in layers:
        for var, key in layer.variables.items():
            if key not in bundle.entries:
                raise KerasFileError(f'{source}: layer {layer.name!r} variable {var!r}: the object graph names '
                                     f'tensor {key!r}, which the index does not hold')
            _add(weights, source, layer.name, var, _as_float32(bundle.read_array(key), source, layer.name, var))
    return KerasWeights(weights, source, tf_format.kind, keras_version)


def read_tf_layout(tf_format: TFFormat) -> str:
    """'flat' or 'nested' (a base model and a Dense head): how Keras itself must be built to load the file."""
    source = str(tf_format.given)
    bundle = _Bundle(tf_format.prefix, source)
    nodes = _object_graph(bundle, source)
    layers = _model_layers(nodes, _find_model(nodes, source), source)
    return 'nested' if any(layer.sublayers is not None for layer in layers) else 'flat'
