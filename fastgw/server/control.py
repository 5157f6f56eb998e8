"""The control channel between the supervisor and one worker: a socketpair carrying
length-prefixed pickled messages (both ends are this package, in processes the supervisor
started, so pickle is a trusted format here and keeps msgspec Structs as they are).

Supervisor -> worker: ("start" | "prepare", version, config, slots), ("commit", version), ("abort", version),
                      ("purge", 0, {"key": ...} | {"host": ..., "path_prefix": ...})
Worker -> supervisor: ("ready" | "prepared" | "applied", version), ("failed" | "rejected", version, message),
                      ("purged", 0, entries removed)
"""
from __future__ import annotations

import asyncio
import pickle
import struct

# A worker's state in its shared-memory slot (fastgw/_core/shm.pyx; 0 = empty slot).
WORKER_STARTING, WORKER_RUNNING, WORKER_DRAINING = 1, 2, 3

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 256 * 1024 * 1024        # a config with 10,000 routes pickles to a few MiB


class ControlChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, sock) -> "ControlChannel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, *message) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)

    async def flush(self) -> None:
        await self._writer.drain()

    async def receive(self) -> tuple | None:
        """The next message, or None when the other side has gone."""
        try:
            (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            if length > MAX_MESSAGE:
                raise ValueError(f"control message of {length} bytes")
            return pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self._writer.close()
