"""The wire format shared by `dap serve` and `dapolicy.client`: msgpack messages with explicit numpy arrays.

Imports only numpy and msgpack (never torch), so the robot-side client installs without the model's stack.

A message is a msgpack map with string keys. A numpy array anywhere inside it travels as a map
    {"__ndarray__": 1, "dtype": "<one of ARRAY_DTYPES>", "shape": [d0, d1, ...], "data": <bin, C order>}
always little-endian. No pickle and no object arrays: decoding bytes from the network can only ever produce
maps, lists, strings, numbers, booleans, None, bytes and plain numeric arrays, and every array is checked
(known dtype, non-negative shape, exactly prod(shape) * itemsize bytes) before numpy sees it.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ARRAY_KEY = "__ndarray__"
# Only plain numeric dtypes cross the wire (names as numpy spells them; little-endian on the wire).
ARRAY_DTYPES: tuple[str, ...] = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                 "float16", "float32", "float64")
MAX_ARRAY_DIMS = 16
DEFAULT_MAX_MESSAGE_MB = 64.0


class WireError(ValueError):
    """Bytes that are not a well-formed message of this protocol (the text says what is wrong)."""


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A numpy array -> the explicit map form (dtype name, shape, little-endian C-order bytes)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in ARRAY_DTYPES:
        raise WireError(f"cannot send an array of dtype {array.dtype} (supported: {', '.join(ARRAY_DTYPES)})")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {ARRAY_KEY: 1, "dtype": name, "shape": list(array.shape), "data": little.tobytes()}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """The map form -> a numpy array, after checking that dtype, shape and byte count agree."""
    extra = set(obj) - {ARRAY_KEY, "dtype", "shape", "data"}
    if extra:
        raise WireError(f"array has unexpected field(s) {sorted(map(str, extra))}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        raise WireError(f"array dtype {dtype!r} is not supported (supported: {', '.join(ARRAY_DTYPES)})")
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_ARRAY_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"array shape {shape!r} is not a list of at most {MAX_ARRAY_DIMS} non-negative ints")
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise WireError(f"array of dtype {dtype} and shape {list(shape)} needs {expected} bytes, got {len(data)}")
    # A copy, so the array is writable and owns its memory (frombuffer would alias the message).
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).astype(np.dtype(dtype), copy=True)


def _to_wire(obj: Any) -> Any:
    """msgpack's `default` hook: arrays and numpy scalars become plain msgpack values."""
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _from_wire(obj: dict[Any, Any]) -> Any:
    return decode_array(obj) if ARRAY_KEY in obj else obj


def pack(message: dict[str, Any]) -> bytes:
    """Encode one message (a dict with string keys; numpy arrays anywhere inside)."""
    if not isinstance(message, dict):
        raise WireError(f"a message must be a dict, got {type(message).__name__}")
    try:
        return msgpack.packb(message, default=_to_wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack reports unsupported values this way
        raise WireError(f"cannot encode message: {exc}") from exc


def unpack(data: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """Decode one message; anything but a well-formed map of this protocol raises `WireError`."""
    if isinstance(data, str):
        raise WireError("expected a binary (msgpack) message, got a text message")
    try:
        # strict_map_key: only str/bytes keys; msgpack bounds every length by the buffer size, so a forged
        # header cannot make it allocate more than the message itself.
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, object_hook=_from_wire, use_list=True)
    except WireError:
        raise
    except Exception as exc:  # malformed bytes surface as many exception types (ExtraData, FormatError, ...)
        raise WireError(f"malformed message ({type(exc).__name__}: {exc})") from exc
    if not isinstance(message, dict):
        raise WireError(f"a message must be a map, got {type(message).__name__}")
    return message
