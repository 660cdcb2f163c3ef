"""JSON from files we did not write (`.keras` config.json / metadata.json), parsed within limits and read with
typed accessors, so that every bad shape is one `KerasFileError` naming the member and the key path.

`json.loads` recurses once per nesting level, so the depth is measured on the raw text first: a hostile
`[[[[...` is refused by its depth, not by a `RecursionError` halfway through. Member sizes are capped by
the caller (before inflating); the depth cap here is far above what Keras writes (ResNet152V2's config.json
is 11 levels deep, 17 when nested twice in other models).
"""
import json
import re
from dataclasses import dataclass
from typing import Any, Type, TypeVar

import numpy as np

from ..errors import KerasFileError

__all__ = ['MAX_JSON_DEPTH', 'JsonDoc', 'load_json', 'json_depth']

MAX_JSON_DEPTH = 64
T = TypeVar('T')

# A complete JSON string, or an unterminated one with everything after it (possessive: linear time on any input).
_STRINGS = re.compile(r'"(?:[^"\\]++|\\.)*+"|"(?s:.*)')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b'[]{}')))
_BRACKET_STEPS = bytes.maketrans(b'[{]}', b'\x01\x01\xff\xff')  # +1 and -1 as int8
_KIND_NAMES = {dict: 'an object', list: 'a list', str: 'a string', int: 'an integer', float: 'a number'}


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in `text`, without parsing it (brackets inside strings ignored).

    On malformed text it counts up to the first unterminated string, which is as far as a parser gets.
    """
    steps = np.frombuffer(_STRINGS.sub('', text).encode('utf-8').translate(_BRACKET_STEPS, _NOT_BRACKETS), np.int8)
    return int(max(np.cumsum(steps, dtype=np.int32).max(), 0)) if steps.size else 0


def load_json(data: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse `data` (UTF-8 JSON) or raise `KerasFileError` naming `where`, e.g. 'model.keras: config.json'."""
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise KerasFileError(f'{where} is not UTF-8 text: {e}') from None
    depth = json_depth(text)
    if depth > max_depth:
        raise KerasFileError(f'{where} is nested {depth} levels deep, over the limit of {max_depth}; Keras writes '
                             'at most a few dozen')
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number over the int digit limit
        raise KerasFileError(f'{where} is not valid JSON (a damaged .keras archive): {type(e).__name__}: {e}') from None


def describe(value: Any) -> str:
    """How a message names a JSON value's kind: 'an object', 'a list', 'null', 'true', ..."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return _KIND_NAMES.get(type(value), type(value).__name__)


_MISSING = object()


@dataclass(frozen=True)
class JsonDoc:
    """Typed access into one parsed JSON document; `where` names it in messages ('model.keras: config.json').

    Key paths are written as `config.layers[3].config`; the empty path is the top level.
    """

    where: str

    def fail(self, path: str, problem: str) -> KerasFileError:
        return KerasFileError(f'{self.where}: {path or "top level"}: {problem}')

    def expect(self, value: Any, kind: Type[T], path: str) -> T:
        """`value` if it is a `kind` (dict, list, str, ...), else the error naming `path`."""
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(path, f'expected {_KIND_NAMES.get(kind, kind.__name__)}, found {describe(value)}')
        return value

    def get(self, obj: dict, key: str, kind: Type[T], path: str, default: Any = _MISSING) -> T:
        """`obj[key]` (obj is at `path`) checked to be a `kind`; `default` when the key is absent, else an error."""
        if key not in obj:
            if default is _MISSING:
                raise self.fail(path, f'missing key {key!r}')
            return default
        return self.expect(obj[key], kind, join(path, key))


def join(path: str, key: Any) -> str:
    """`config` + `layers` -> `config.layers`; `config.layers` + 3 -> `config.layers[3]`."""
    if isinstance(key, int):
        return f'{path}[{key}]'
    return f'{path}.{key}' if path else str(key)
