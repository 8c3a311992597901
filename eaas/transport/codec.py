"""Message codec: nested values with torch.Tensor leaves <-> msgpack header + raw tensor bytes.

A frame on a byte stream is

    prefix  16 bytes: magic b"EAF1", header_len u32 LE, body_len u64 LE
    header  msgpack map {"k": kind, "m": tree (msgpack bin), "t": [[dtype, shape, offset], ...],
                         ...scheme extras}
    body    tensor bytes, each tensor starting at a multiple of ALIGN (64) from the body start

The tree is msgpack with two extension types: TENSOR (payload: msgpack int index into "t") and
TUPLE (payload: a msgpack array), so tuples come back as tuples; cudaipc:// adds a third, CUDA
(payload: msgpack int index into its "c" device-tensor list). Nothing is ever unpickled:
a frame can only produce dicts, lists, tuples, str, bytes, int, float, bool, None and tensors
of the dtypes in DTYPES, and every length is checked against TransportLimits before use:
the tree is walked as raw bytes first (eaas.transport.scan: nesting depth, value count,
declared lengths, extension types), so a hostile frame is refused before msgpack allocates or
recurses for it (the header has no extension types: msgpack unpacks it without recursing,
lengths capped by max_header_bytes).

Typed messages (frozen dataclasses) travel as tagged maps {"op": tag, field: value, ...}:
their registry (`eaas.transport.wire.MessageTypes`, passed as `types=`) encodes them and
decodes a received tree back, checking every field; the frame itself stays a plain tree.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import msgpack
import torch

from eaas.errors import FrameError
from eaas.transport.limits import TransportLimits
from eaas.transport.scan import check_msgpack

if TYPE_CHECKING:
    from eaas.transport.wire import MessageTypes

__all__ = ["encode_message", "decode_message", "EncodedMessage", "DTYPES"]

MAGIC = b"EAF1"
PREFIX = struct.Struct("<4sIQ")
PREFIX_BYTES = PREFIX.size  # 16
ALIGN = 64
EXT_TENSOR = 1
EXT_TUPLE = 2
EXT_CUDA = 3  # cudaipc:// only: a CUDA tensor that travels through a device slot
KIND_MESSAGE = 0

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_DEFAULT_LIMITS = TransportLimits()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(slots=True)
class EncodedMessage:
    """A message split into a packed tree and flat byte views of its tensors (not yet framed).

    tensors: each a contiguous CPU uint8 tensor [nbytes] viewing (not copying) the sender's data
             unless the original was non-contiguous / not on CPU (then a fresh copy).
    descs:   [dtype name, shape, offset] per tensor; offsets are relative to the body start.
    cuda:    with `flatten(..., keep_cuda=True)`: the CUDA tensors (detached, as sent), which the
             tree references as CUDA extensions by index; they are not part of the body.
    """

    tree: bytes
    tensors: list[torch.Tensor] = field(default_factory=list)
    descs: list[list[Any]] = field(default_factory=list)
    body_bytes: int = 0
    cuda: list[torch.Tensor] = field(default_factory=list)

    def header(self, kind: int = KIND_MESSAGE, **extra: Any) -> bytes:
        return msgpack.packb({"k": kind, "m": self.tree, "t": self.descs, **extra})

    def frame_parts(self, limits: TransportLimits = _DEFAULT_LIMITS) -> list[Any]:
        """Prefix+header as one bytes object, then (padding, tensor bytes) pieces, for writing."""
        header = self.header()
        check_frame_size(len(header), self.body_bytes, limits)
        parts: list[Any] = [PREFIX.pack(MAGIC, len(header), self.body_bytes) + header]
        pos = 0
        for flat, desc in zip(self.tensors, self.descs):
            if desc[2] > pos:
                parts.append(bytes(desc[2] - pos))
            nbytes = flat.numel()
            if nbytes:
                parts.append(memoryview(flat.numpy()))
            pos = desc[2] + nbytes
        if self.body_bytes > pos:
            parts.append(bytes(self.body_bytes - pos))
        return parts


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:] = src for same-size 1-D uint8 CPU tensors, as one plain memcpy.

    Not `dst.copy_(src)`: torch splits big copies across its intra-op thread pool, whose
    spinning workers fight the event loop (and the peer process) for cores; measured at
    ~15 ms for 256 KiB on a 2-core box instead of ~3 us.
    """
    if src.numel():
        dst.numpy()[:] = src.numpy()


def clone_tensor(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of a contiguous CPU tensor, made with copy_bytes."""
    out = torch.empty(t.shape, dtype=t.dtype)
    copy_bytes(out.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    return out


def check_frame_size(header_len: int, body_len: int, limits: TransportLimits) -> None:
    """ValueError if a frame we are about to send breaks the limits (the peer would drop it)."""
    if header_len > limits.max_header_bytes:
        raise ValueError(f"message header is {header_len} bytes > max_header_bytes="
                         f"{limits.max_header_bytes}")
    if PREFIX_BYTES + header_len + body_len > limits.max_frame_bytes:
        raise ValueError(f"message frame is {PREFIX_BYTES + header_len + body_len} bytes > "
                         f"max_frame_bytes={limits.max_frame_bytes}")


def flatten(msg: Any, limits: TransportLimits = _DEFAULT_LIMITS, *,
            keep_cuda: bool | Callable[[torch.Tensor], bool] = False) -> EncodedMessage:
    """Pack `msg`'s tree and collect its tensors (made contiguous, moved to CPU, detached).

    keep_cuda: leave CUDA tensors where they are: collect them (detached) in `out.cuda` and pack
    CUDA extensions in the tree instead of copying them into the body (cudaipc://). A callable
    picks the tensors to keep out of the body instead (nvshmem://: those its fabric carries).
    """
    out = EncodedMessage(tree=b"")
    offset = 0
    keep = keep_cuda if callable(keep_cuda) else (lambda t: keep_cuda and t.is_cuda)

    def default(obj: Any) -> Any:
        nonlocal offset
        if isinstance(obj, torch.Tensor):
            dtype = _DTYPE_NAMES.get(obj.dtype)
            if dtype is None:
                raise TypeError(f"tensor dtype {obj.dtype} cannot be sent; allowed: {list(DTYPES)}")
            if len(out.tensors) + len(out.cuda) >= limits.max_tensors:
                raise ValueError(f"message has more than max_tensors={limits.max_tensors} tensors")
            if obj.dim() > limits.max_ndim:
                raise ValueError(f"tensor has {obj.dim()} dims > max_ndim={limits.max_ndim}")
            if keep(obj):
                out.cuda.append(obj.detach())
                return msgpack.ExtType(EXT_CUDA, msgpack.packb(len(out.cuda) - 1))
            t = obj.detach().to("cpu").contiguous()
            flat = t.reshape(-1).view(torch.uint8)  # [nbytes]
            out.descs.append([dtype, list(t.shape), offset])
            out.tensors.append(flat)
            offset = _align(offset + flat.numel())
            return msgpack.ExtType(EXT_TENSOR, msgpack.packb(len(out.tensors) - 1))
        if isinstance(obj, tuple):
            return msgpack.ExtType(EXT_TUPLE, _pack(list(obj), default))
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(f"cannot send object of type {type(obj).__name__}; allowed leaves: str, "
                        "int, float, bool, None, bytes, torch.Tensor in dict/list/tuple")

    out.tree = _pack(msg, default)
    out.body_bytes = out.descs[-1][2] + out.tensors[-1].numel() if out.tensors else 0
    return out


def _pack(obj: Any, default: Any) -> bytes:
    return msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True)


def check_tree(tree: bytes, limits: TransportLimits, *, cuda: bool = False) -> None:
    """FrameError unless the packed message tree keeps `limits.max_depth` / `max_elements`
    and uses only eaas's extension types (CUDA ones only if `cuda`)."""
    check_msgpack(tree, max_depth=limits.max_depth, max_elements=limits.max_elements,
                  nested_exts=(EXT_TUPLE,),
                  leaf_exts=(EXT_TENSOR, EXT_CUDA) if cuda else (EXT_TENSOR,))


def parse_header(header: bytes | memoryview, limits: TransportLimits) -> dict[str, Any]:
    """Unpack and shape-check a frame header; FrameError on anything unexpected."""
    try:  # no extension types, so msgpack's unpacker never recurses (its own depth cap holds)
        head = msgpack.unpackb(header, raw=False, strict_map_key=True,
                               max_bin_len=limits.max_header_bytes, max_ext_len=0)
    except Exception as exc:
        raise FrameError(f"malformed frame header: {exc!r}") from None
    if (not isinstance(head, dict) or not isinstance(head.get("k"), int)
            or not isinstance(head.get("m"), bytes) or not isinstance(head.get("t"), list)):
        raise FrameError("malformed frame header: expected map with int 'k', bin 'm', array 't'")
    if len(head["t"]) > limits.max_tensors:
        raise FrameError(f"frame has {len(head['t'])} tensors > max_tensors={limits.max_tensors}")
    return head


def build_tensors(descs: list[Any], body: Any, limits: TransportLimits,
                  copy: bool = False) -> list[torch.Tensor]:
    """Tensors described by `descs` over `body` (a writable buffer or a uint8 tensor [size]);
    views of `body` unless `copy`."""
    if isinstance(body, torch.Tensor):
        flat, size = body, body.numel()
    else:
        size = memoryview(body).nbytes
        flat = torch.frombuffer(body, dtype=torch.uint8) if size else None  # [size]
    tensors = []
    for desc in descs:
        try:
            name, shape, offset = desc
            dtype = DTYPES[name]
            if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                    or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or not isinstance(offset, int)):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise FrameError(f"malformed tensor descriptor {desc!r}") from None
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if offset < 0 or offset % itemsize or offset + nbytes > size:
            raise FrameError(f"tensor descriptor {desc!r} does not fit a body of {size} bytes")
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        assert flat is not None
        t = flat[offset:offset + nbytes].view(dtype).view(shape)
        tensors.append(clone_tensor(t) if copy else t)
    return tensors


def unflatten(tree: bytes, tensors: list[torch.Tensor], limits: TransportLimits,
              cuda: list[torch.Tensor] | None = None) -> Any:
    """Rebuild the message tree, substituting tensors for TENSOR extensions.

    cuda: the tensors CUDA extensions refer to (cudaipc://); None: a CUDA extension is malformed.
    """

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_TENSOR or (code == EXT_CUDA and cuda is not None):
            table = tensors if code == EXT_TENSOR else cuda
            assert table is not None
            index = msgpack.unpackb(data)
            if not isinstance(index, int) or not 0 <= index < len(table):
                raise FrameError(f"tensor reference {index!r} out of range")
            return table[index]
        if code == EXT_TUPLE:
            return tuple(unpack(data))
        raise FrameError(f"unknown msgpack extension type {code}")

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=ext_hook)

    # before unpacking: msgpack recurses in C per nested extension (a deep tree overflowed
    # the stack), and allocates containers at their declared sizes
    check_tree(tree, limits, cuda=cuda is not None)
    try:
        return unpack(tree)
    except FrameError:
        raise
    except Exception as exc:
        raise FrameError(f"malformed message tree: {exc!r}") from None


def check_prefix(prefix: bytes | memoryview, limits: TransportLimits) -> tuple[int, int]:
    """(header_len, body_len) from a 16-byte prefix; FrameError if bad magic or over limits."""
    magic, header_len, body_len = PREFIX.unpack(prefix)
    if magic == b"EAH1":  # eaas.transport.handshake.HELLO_MAGIC
        raise FrameError("the peer asks for the cluster-secret handshake: connect with "
                         "security=TransportSecurity.from_env() (EAAS_CLUSTER_SECRET)")
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}); "
                         "not an eaas peer?")
    if header_len > limits.max_header_bytes:
        raise FrameError(f"frame header of {header_len} bytes > max_header_bytes="
                         f"{limits.max_header_bytes}")
    if PREFIX_BYTES + header_len + body_len > limits.max_frame_bytes:
        raise FrameError(f"frame of {PREFIX_BYTES + header_len + body_len} bytes > "
                         f"max_frame_bytes={limits.max_frame_bytes}")
    return header_len, body_len


def encode_message(msg: Any, *, limits: TransportLimits = _DEFAULT_LIMITS,
                   types: MessageTypes | None = None) -> bytes:
    """One complete frame (prefix + header + body) for `msg`, as tcp:// sends it.

    msg: nested dict/list/tuple of str/int/float/bool/None/bytes with torch.Tensor leaves of a
    dtype in DTYPES (any shape, any device, contiguous or not). TypeError/ValueError if not.
    types: a registry of message dataclasses (eaas.transport.wire); a `msg` of a registered
    type is sent as its tagged tree.
    """
    if types is not None and msg in types:
        msg = types.encode(msg)
    return b"".join(bytes(p) for p in flatten(msg, limits).frame_parts(limits))


def decode_message(frame: bytes | bytearray | memoryview, *,
                   limits: TransportLimits = _DEFAULT_LIMITS,
                   types: MessageTypes | None = None) -> Any:
    """Inverse of encode_message; tensors are fresh (they own a copy of the frame's body).

    FrameError if the frame is truncated, has trailing bytes, breaks `limits` or is malformed.
    types: the message must be a tagged tree of one of these types; it comes back as that
    dataclass (ValueError naming the field if it is not one exactly).
    """
    view = memoryview(frame).cast("B")
    if len(view) < PREFIX_BYTES:
        raise FrameError(f"truncated frame: {len(view)} bytes < {PREFIX_BYTES}-byte prefix")
    header_len, body_len = check_prefix(view[:PREFIX_BYTES], limits)
    if len(view) != PREFIX_BYTES + header_len + body_len:
        raise FrameError(f"frame is {len(view)} bytes, prefix says "
                         f"{PREFIX_BYTES + header_len + body_len}")
    head = parse_header(view[PREFIX_BYTES:PREFIX_BYTES + header_len], limits)
    if head["k"] != KIND_MESSAGE:
        raise FrameError(f"unexpected frame kind {head['k']}")
    body = bytearray(view[PREFIX_BYTES + header_len:])
    msg = unflatten(head["m"], build_tensors(head["t"], body, limits), limits)
    return msg if types is None else types.decode(msg)
