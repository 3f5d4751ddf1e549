"""A read-only, seekable file over ranged reads, so pydicom can parse a stored object it never loads whole.

pydicom reads a header with many tiny reads and then seeks to the frame it decodes; each tiny read becoming
a storage request would be slow, so reads go through a small cache of aligned blocks, and reads larger than
a block (a frame) go to storage as one range.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable

BLOCK_SIZE = 64 * 1024
CACHED_BLOCKS = 16


class RangeFile(io.RawIOBase):
    """`fetch(start, end)` returns the bytes [start, end) of an object of `size` bytes (fewer at its end)."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int, name: str = "<stored object>") -> None:
        super().__init__()
        self.name = name  # pydicom names the file in messages
        self._fetch = fetch
        self._size = size
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self.requests = 0  # ranged reads issued (tests and benchmarks look)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            start = index * BLOCK_SIZE
            block = self._get(start, min(start + BLOCK_SIZE, self._size))
            self._blocks[index] = block
            if len(self._blocks) > CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(index)
        return block

    def _get(self, start: int, end: int) -> bytes:
        self.requests += 1
        return self._fetch(start, end)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), max(self._size - self._pos, 0))
        if want <= 0:
            return 0
        start, end = self._pos, self._pos + want
        if want > BLOCK_SIZE:
            data = self._get(start, end)
        else:
            first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            joined = b"".join(self._block(i) for i in range(first, last + 1))
            data = joined[start - first * BLOCK_SIZE : end - first * BLOCK_SIZE]
        n = len(data)
        memoryview(buffer)[:n] = data
        self._pos += n
        return n
