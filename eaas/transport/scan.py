"""Bounds check of raw msgpack bytes, run before anything in them is unpacked.

msgpack's own unpacker allocates as it goes and recurses in C once per extension value it
hands to a hook (each level a large C frame): ~200 nested extension types in a 1 KB frame
overflowed the stack and killed the process. `check_msgpack` walks the bytes with an explicit
stack instead, and refuses a tree that is too deep, has too many values, declares lengths past
its end, or uses an extension type it was not told about, so the unpacker only ever sees trees
that are small, shallow and well formed.

    check_msgpack(tree, max_depth=32, max_elements=1 << 17, nested_exts={2}, leaf_exts={1, 3})
"""

from __future__ import annotations

from collections.abc import Collection

from eaas.errors import FrameError

__all__ = ["check_msgpack"]

# what each type byte starts: (kind, argument)
_SKIP, _STR_LEN, _ARRAY_N, _MAP_N, _ARRAY_LEN, _MAP_LEN, _FIXEXT, _EXT_LEN, _BAD = range(9)


def _kinds() -> list[tuple[int, int]]:
    kinds = [(_BAD, 0)] * 256
    for b in range(0x00, 0x80):
        kinds[b] = (_SKIP, 0)  # positive fixint
    for b in range(0xE0, 0x100):
        kinds[b] = (_SKIP, 0)  # negative fixint
    for b in range(0x80, 0x90):
        kinds[b] = (_MAP_N, b & 0x0F)
    for b in range(0x90, 0xA0):
        kinds[b] = (_ARRAY_N, b & 0x0F)
    for b in range(0xA0, 0xC0):
        kinds[b] = (_SKIP, b & 0x1F)  # fixstr
    for b in (0xC0, 0xC2, 0xC3):
        kinds[b] = (_SKIP, 0)  # nil, false, true
    for b, n in ((0xCA, 4), (0xCB, 8), (0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8),
                 (0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        kinds[b] = (_SKIP, n)  # floats, ints
    for b, w in ((0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xDA, 2), (0xDB, 4)):
        kinds[b] = (_STR_LEN, w)  # bin8/16/32, str8/16/32: length field width
    for b, n in ((0xD4, 1), (0xD5, 2), (0xD6, 4), (0xD7, 8), (0xD8, 16)):
        kinds[b] = (_FIXEXT, n)
    for b, w in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        kinds[b] = (_EXT_LEN, w)
    kinds[0xDC], kinds[0xDD] = (_ARRAY_LEN, 2), (_ARRAY_LEN, 4)
    kinds[0xDE], kinds[0xDF] = (_MAP_LEN, 2), (_MAP_LEN, 4)
    return kinds


_KINDS = _kinds()


def check_msgpack(data: bytes, *, max_depth: int, max_elements: int,
                  nested_exts: Collection[int] = (), leaf_exts: Collection[int] = ()) -> None:
    """FrameError unless `data` is exactly one msgpack value within the bounds.

    max_depth:    deepest nesting of arrays, maps and `nested_exts` (the top value is depth 0).
    max_elements: most values in all (containers, map keys, leaves; an extension counts once
                  plus what its payload holds when it nests).
    nested_exts:  extension codes whose payload is itself one msgpack value (eaas's TUPLE: an
                  array); it is checked as part of the tree, one level deeper.
    leaf_exts:    extension codes whose payload is opaque (checked by their own decoder).
    Any other extension code, a reserved type byte (0xC1), a truncated value or trailing bytes
    is refused. Cost: one pass over the values, no allocation beyond the stack of open levels.
    """
    n = len(data)
    pos = 0
    count = 0
    kinds = _KINDS
    # one entry per open level: [values still to read, end offset of an ext payload or -1]
    stack: list[list[int]] = [[1, -1]]
    while stack:
        top = stack[-1]
        if top[0] == 0:
            stack.pop()
            if top[1] >= 0 and pos != top[1]:
                raise FrameError("malformed message tree: an extension's payload is not "
                                 "exactly one value")
            continue
        top[0] -= 1
        count += 1
        if count > max_elements:
            raise FrameError(f"message tree has more than max_elements={max_elements} values")
        if pos >= n:
            raise FrameError("malformed message tree: truncated")
        kind, arg = kinds[data[pos]]
        pos += 1
        if kind == _SKIP:
            pos += arg
            if pos > n:
                raise FrameError("malformed message tree: truncated")
            continue
        items = 0
        if kind == _ARRAY_N:
            items = arg
        elif kind == _MAP_N:
            items = 2 * arg
        elif kind == _STR_LEN:
            size, pos = _read_len(data, pos, arg)
            pos += size
            if pos > n:
                raise FrameError("malformed message tree: truncated")
            continue
        elif kind == _ARRAY_LEN:
            items, pos = _read_len(data, pos, arg)
        elif kind == _MAP_LEN:
            items, pos = _read_len(data, pos, arg)
            items *= 2
        elif kind == _FIXEXT or kind == _EXT_LEN:
            size = arg
            if kind == _EXT_LEN:
                size, pos = _read_len(data, pos, arg)
            if pos >= n:
                raise FrameError("malformed message tree: truncated")
            code = data[pos] - 256 if data[pos] >= 0x80 else data[pos]
            pos += 1
            if pos + size > n:
                raise FrameError("malformed message tree: truncated")
            if code in nested_exts:
                if len(stack) > max_depth:
                    raise FrameError(f"message tree nests deeper than max_depth={max_depth}")
                stack.append([1, pos + size])
                continue
            if code not in leaf_exts:
                raise FrameError(f"unknown msgpack extension type {code}")
            pos += size
            continue
        else:  # 0xC1: never used
            raise FrameError(f"malformed message tree: reserved type byte {data[pos - 1]:#x}")
        if len(stack) > max_depth:  # a container opens
            raise FrameError(f"message tree nests deeper than max_depth={max_depth}")
        if items:
            stack.append([items, -1])
    if pos != n:
        raise FrameError(f"malformed message tree: {n - pos} trailing bytes")


def _read_len(data: bytes, pos: int, width: int) -> tuple[int, int]:
    end = pos + width
    if end > len(data):
        raise FrameError("malformed message tree: truncated")
    return int.from_bytes(data[pos:end], "big"), end
