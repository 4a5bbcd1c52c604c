"""An append-only file of log records Kafka has not acknowledged, replayed in order.

Frames are length-prefixed and CRC-checked, so a torn write at a crash is detected
and ignored rather than corrupting what follows. A separate checkpoint file holds how
far replay has been acknowledged; a restart resumes from there (at-least-once).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

_HEADER = struct.Struct(">HIII")  # topic len, key len, value len, crc32 of the payload
# A frame with Kafka headers sets this bit of the topic length; its value part is then
# `>H` headers length, the headers (JSON `[[name, hex value], ...]`), the value. Frames
# without headers are written as before, so older spools read unchanged.
_WITH_HEADERS = 0x8000
_HLEN = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()  # Kafka headers (a correction's signature)


class SpoolCorrupt(RuntimeError):
    """The spool has a bad frame before its end: refuse to guess what it held."""


class SpoolLocked(RuntimeError):
    """Another process already owns this spool; two writers would interleave frames."""


class Spool:
    """Thread-safe: the request path may append when the queue is full."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.checkpoint_path = path.with_name(path.name + ".offset")
        self.fsync = fsync
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLocked(
                f"{path} is in use by another process; give each service replica its own "
                "FLYWHEEL_HOME"
            ) from None
        self._offset = self._read_checkpoint()
        self._end = self._offset  # the file's size past the last whole frame
        self._pending = self._recover()

    def close(self) -> None:
        """Release the spool for another process (what is pending stays on disk)."""
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes of frames not yet acknowledged (what FLYWHEEL_SPOOL_MAX_BYTES bounds)."""
        return self._end - self._offset

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        chunks = []
        for r in records:
            topic = r.topic.encode()
            value, flag = r.value, 0
            if r.headers:
                block = orjson.dumps([[n, v.hex()] for n, v in r.headers])
                value, flag = _HLEN.pack(len(block)) + block + r.value, _WITH_HEADERS
            payload = topic + r.key + value
            chunks.append(
                _HEADER.pack(len(topic) | flag, len(r.key), len(value), zlib.crc32(payload))
            )
            chunks.append(payload)
        data = b"".join(chunks)
        with self._lock, open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            self._pending += len(records)
            self._end += len(data)

    def peek(self, limit: int) -> tuple[list[Record], int]:
        """Up to `limit` records from the checkpoint on, and the offset just past them."""
        records: list[Record] = []
        end = self._offset
        for record, next_offset in self._frames(self._offset):
            if len(records) >= limit:
                break
            records.append(record)
            end = next_offset
        return records, end

    def commit(self, offset: int, count: int) -> None:
        """Mark records up to `offset` delivered; an emptied spool is truncated."""
        with self._lock:
            self._offset = offset
            self._pending = max(0, self._pending - count)
            if self._pending == 0:
                self.path.unlink(missing_ok=True)
                self.checkpoint_path.unlink(missing_ok=True)
                self._offset = self._end = 0
                return
            tmp = self.checkpoint_path.with_suffix(".tmp")
            tmp.write_text(str(offset))
            os.replace(tmp, self.checkpoint_path)

    def _recover(self) -> int:
        """Count pending frames and cut off a torn tail so later appends stay readable."""
        count, end = 0, self._offset
        for _, next_offset in self._frames(self._offset):
            count, end = count + 1, next_offset
        if self.path.exists() and self.path.stat().st_size > end:
            with open(self.path, "r+b") as f:
                f.truncate(end)
        self._end = end
        return count

    def _read_checkpoint(self) -> int:
        try:
            return int(self.checkpoint_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise SpoolCorrupt(f"{self.checkpoint_path}: not an offset") from exc

    def _frames(self, start: int) -> Iterator[tuple[Record, int]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            f.seek(start)
            offset = start
            while offset + _HEADER.size <= size:
                tlen, klen, vlen, crc = _HEADER.unpack(f.read(_HEADER.size))
                flag, tlen = tlen & _WITH_HEADERS, tlen & ~_WITH_HEADERS
                end = offset + _HEADER.size + tlen + klen + vlen
                if end > size:
                    return  # torn final write: the record was never fully spooled
                payload = f.read(tlen + klen + vlen)
                if zlib.crc32(payload) != crc:
                    if end == size:
                        return
                    raise SpoolCorrupt(f"{self.path}: bad checksum at byte {offset}")
                value = payload[tlen + klen :]
                headers: tuple[tuple[str, bytes], ...] = ()
                if flag:
                    (hlen,) = _HLEN.unpack_from(value)
                    block = value[_HLEN.size : _HLEN.size + hlen]
                    headers = tuple((n, bytes.fromhex(v)) for n, v in orjson.loads(block))
                    value = value[_HLEN.size + hlen :]
                yield (
                    Record(payload[:tlen].decode(), payload[tlen : tlen + klen], value, headers),
                    end,
                )
                offset = end
