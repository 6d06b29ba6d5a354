"""How messages travel: msgpack, each registered message as an extension holding its type tag and field values.

Token-id sequences travel as ``array('i')`` (packed int32 bytes). A message field declared ``columns()`` (a list
of one message type: a step plan's chunks, a batch of token updates) travels column by column: each field's values
as one list, and each token-id field as one joined int32 buffer with the lengths beside it, so a plan of a thousand
chunks costs a few packed objects rather than thousands of nested ones. ``decode`` rejects unknown tags, malformed
columns and oversized frames, so a confused or hostile peer cannot make a process allocate without bound or act on
a message it does not know. Decoding fills a message's fields without running its constructor: what was validated
where it entered the engine (SamplingParams, at the API edge or in the offline API) is not validated again in every
process it crosses. The messages themselves are in protocol.py.
"""
from __future__ import annotations

import dataclasses
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import msgpack
from typing_extensions import dataclass_transform

_T = TypeVar("_T")

_EXT_MESSAGE = 1
_EXT_INT32 = 2
_EXT_COLUMNS = 3
_COLUMNS_KEY = "nanoslg.columns"

_TAGS: dict[str, type] = {}
# per message type: its field names, and for each a factory of its default (None: the field is required)
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[Any, ...]]] = {}
# messages whose constructor validates, decoded without running it: a generated function assigns every field
_VALIDATING: dict[type, Any] = {}
# per message type, a generated function listing its tag and field values (the codec's hottest line)
_WIRE: dict[type, Any] = {}
# per message type: which of its fields are token-id arrays (joined into one buffer when a list of it travels as
# columns)
_ARRAY_FIELDS: dict[type, tuple[bool, ...]] = {}


def columns(**kwargs: Any) -> Any:
    """A message field holding a list of one message type that travels column by column (see the module doc)."""
    return field(metadata={_COLUMNS_KEY: True}, **kwargs)


def _generated(source: str, scope: Optional[dict[str, Any]] = None) -> Any:
    scope = dict(scope or {})
    exec(source, scope)  # noqa: S102 - the names in it come from dataclass fields
    return scope["f"]


def _field_setter(names: tuple[str, ...]) -> Any:
    body = "".join(f"    obj.{n} = {n}\n" for n in names)
    return _generated(f"def f(obj, {', '.join(names)}):\n{body}    return obj\n")


def register(cls: type[_T]) -> type[_T]:
    tag = cls.__name__
    if tag in _TAGS:
        raise TypeError(f"duplicate message tag {tag}")
    _TAGS[tag] = cls
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # every message is a dataclass
    names = tuple(f.name for f in fields)
    if hasattr(cls, "__post_init__"):
        _VALIDATING[cls] = _field_setter(names)
    values = "".join(f"_columns(obj.{f.name}), " if f.metadata.get(_COLUMNS_KEY) else f"obj.{f.name}, "
                     for f in fields)
    _WIRE[cls] = _generated(f"def f(obj):\n    return [{tag!r}, {values}]\n", {"_columns": _columns})
    _ARRAY_FIELDS[cls] = tuple(f.type in ("array[int]", "array") for f in fields)  # token ids, never None
    _FIELDS[cls] = (names, tuple(
        (lambda v=f.default: v) if f.default is not dataclasses.MISSING else
        f.default_factory if f.default_factory is not dataclasses.MISSING else None for f in fields))
    return cls


@dataclass_transform()
def message(cls: type[_T]) -> type[_T]:
    """Register a dataclass as a wire message under its class name."""
    return register(dataclass(slots=True)(cls))


class ProtocolError(ValueError):
    pass


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, array):
        if obj.typecode != "i":
            raise TypeError(f"only int32 arrays travel, got typecode {obj.typecode!r}")
        return msgpack.ExtType(_EXT_INT32, obj.tobytes())
    wire = _WIRE.get(type(obj))
    if wire is not None:
        return msgpack.ExtType(_EXT_MESSAGE, _pack(wire(obj)))
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _columns(items: Any) -> Any:
    """A list of one registered message type as an _EXT_COLUMNS extension: [tag, rows, column, ...], a token-id
    field's column as [lengths, joined ids] (int32 bytes both). Anything else (an empty list, mixed types, a
    token-id field that is not an int32 array) goes as the plain list."""
    if not isinstance(items, list) or not items:
        return items
    cls = type(items[0])
    arrays = _ARRAY_FIELDS.get(cls)
    if not arrays or any(type(x) is not cls for x in items):  # unregistered, or no fields to make columns of
        return items
    wire = _WIRE[cls]
    rows = [wire(x) for x in items]  # [tag, value, ...] per item
    cols: list[Any] = [cls.__name__, len(items)]
    for i, is_array in enumerate(arrays, start=1):
        values = [row[i] for row in rows]
        if is_array:
            if any(type(v) is not array or v.typecode != "i" for v in values):
                return items
            cols.append([array("i", map(len, values)).tobytes(), b"".join([v.tobytes() for v in values])])
        else:
            cols.append(values)
    return msgpack.ExtType(_EXT_COLUMNS, _pack(cols))


def _int32s(data: Any, what: str) -> array[int]:
    out = array("i")
    if not isinstance(data, bytes) or len(data) % 4:
        raise ProtocolError(f"malformed columns: {what} is not int32 bytes")
    out.frombytes(data)
    return out


def _from_columns(data: bytes) -> list[Any]:
    tag, rows, *cols = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    cls = _TAGS.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    arrays = _ARRAY_FIELDS[cls]
    if type(rows) is not int or rows < 0 or not arrays or len(cols) != len(arrays):
        raise ProtocolError(f"malformed {tag} columns: {len(cols)} columns for {len(arrays)} fields")
    values: list[list[Any]] = []
    for is_array, col in zip(arrays, cols):
        if not is_array:
            if not isinstance(col, list) or len(col) != rows:
                raise ProtocolError(f"malformed {tag} columns: a column is not {rows} values")
            values.append(col)
            continue
        if not isinstance(col, list) or len(col) != 2:
            raise ProtocolError(f"malformed {tag} columns: a token-id column is not [lengths, ids]")
        lengths, joined = _int32s(col[0], "lengths"), _int32s(col[1], "ids")
        if len(lengths) != rows or min(lengths, default=0) < 0 or sum(lengths) != len(joined):
            raise ProtocolError(f"malformed {tag} columns: token-id lengths do not match the ids")
        ends = list(itertools.accumulate(lengths))
        values.append([joined[end - n:end] for n, end in zip(lengths, ends)])
    return [_message(cls, tag, list(row)) for row in zip(*values)]


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_INT32:
        out = array("i")
        out.frombytes(data)
        return out
    if code == _EXT_COLUMNS:
        return _from_columns(data)
    if code == _EXT_MESSAGE:
        tag, *values = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        cls = _TAGS.get(tag)
        if cls is None:
            raise ProtocolError(f"unknown message tag {tag!r}")
        return _message(cls, tag, values)
    raise ProtocolError(f"unknown extension type {code}")


def _message(cls: type, tag: str, values: list[Any]) -> Any:
    """A message of cls from its decoded field values."""
    assign = _VALIDATING.get(cls)
    if assign is None:  # a plain dataclass constructor only assigns: the quickest way in
        try:
            return cls(*values)
        except TypeError as e:
            raise ProtocolError(f"malformed {tag}: {e}") from None
    names, defaults = _FIELDS[cls]
    if len(values) == len(names):
        return assign(object.__new__(cls), *values)
    if len(values) > len(names):
        raise ProtocolError(f"malformed {tag}: {len(values)} fields, it has {len(names)}")
    msg: Any = object.__new__(cls)
    for i, name in enumerate(names):
        if i < len(values):
            value = values[i]
        elif defaults[i] is None:
            raise ProtocolError(f"malformed {tag}: no {name}")
        else:
            value = defaults[i]()
        object.__setattr__(msg, name, value)
    return msg


# a Packer per nesting level in use: making one per nested message costs more than packing
_idle_packers: list[msgpack.Packer] = []


def _pack(obj: Any) -> bytes:
    packer = _idle_packers.pop() if _idle_packers else msgpack.Packer(default=_default, use_bin_type=True)
    try:
        packed: bytes = packer.pack(obj)
        return packed
    except BaseException:
        packer.reset()
        raise
    finally:
        _idle_packers.append(packer)


def encode(msg: Any) -> bytes:
    if type(msg) not in _FIELDS:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    return _pack(msg)


def decode(frame: bytes, max_bytes: int) -> Any:
    """The message in frame; ProtocolError for anything else, or a frame over max_bytes."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        msg = msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
    if type(msg) not in _FIELDS:
        raise ProtocolError(f"frame is not a tagged message: {type(msg).__name__}")
    return msg
