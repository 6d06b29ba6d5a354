"""How messages travel: msgpack, each registered message as an extension holding its type tag and field values.

Token-id sequences travel as ``array('i')`` (packed int32 bytes). ``decode`` rejects unknown tags and oversized
frames, so a confused or hostile peer cannot make a process allocate without bound or act on a message it does not
know. Decoding fills a message's fields without running its constructor: what was validated where it entered the
engine (SamplingParams, at the API edge or in the offline API) is not validated again in every process it crosses.
The messages themselves are in protocol.py.
"""
from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from typing_extensions import dataclass_transform

_T = TypeVar("_T")

_EXT_MESSAGE = 1
_EXT_INT32 = 2

_TAGS: dict[str, type] = {}
# per message type: its field names, and for each a factory of its default (None: the field is required)
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[Any, ...]]] = {}
# messages whose constructor validates, decoded without running it: a generated function assigns every field
_VALIDATING: dict[type, Any] = {}
# per message type, a generated function listing its tag and field values (the codec's hottest line)
_WIRE: dict[type, Any] = {}


def _generated(source: str) -> Any:
    scope: dict[str, Any] = {}
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
    _WIRE[cls] = _generated(f"def f(obj):\n    return [{tag!r}, {''.join(f'obj.{n}, ' for n in names)}]\n")
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


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_INT32:
        out = array("i")
        out.frombytes(data)
        return out
    if code == _EXT_MESSAGE:
        tag, *values = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        cls = _TAGS.get(tag)
        if cls is None:
            raise ProtocolError(f"unknown message tag {tag!r}")
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
    raise ProtocolError(f"unknown extension type {code}")


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
