"""The server's queue limits over several API-server processes: each process writes its requests in progress and
waiting to start into its own slot of a small file every process maps, and checks a new request against the sum.
Connections are not spread evenly over processes that share one accept queue, so a per-process share of a limit
would refuse requests while other processes sit idle. Reads race with writes; the sum is off by at most the
requests admitted in the same instant, which the limits tolerate."""
from __future__ import annotations

import mmap
import os
import struct

_SLOT = struct.Struct("qq")  # requests in progress, requests waiting to start


def create(path: str, slots: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * _SLOT.size * slots)


class QueueCounts:
    def __init__(self, path: str, index: int):
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.index = index
        self.slots = len(self._map) // _SLOT.size
        self.publish(0, 0)

    def publish(self, in_progress: int, waiting: int) -> None:
        _SLOT.pack_into(self._map, self.index * _SLOT.size, in_progress, waiting)

    def others(self) -> tuple[int, int]:
        """(in progress, waiting) summed over the other processes' slots."""
        in_progress = waiting = 0
        for k in range(self.slots):
            if k != self.index:
                a, b = _SLOT.unpack_from(self._map, k * _SLOT.size)
                in_progress, waiting = in_progress + a, waiting + b
        return in_progress, waiting

    def clear(self, index: int) -> None:
        """A process that died holds nothing any more."""
        _SLOT.pack_into(self._map, index * _SLOT.size, 0, 0)
