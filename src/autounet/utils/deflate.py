"""A file gzipped in pieces on several cores, as one ordinary gzip member (RFC 1952).

Each piece is deflated on its own (no dictionary shared across pieces) and all but the last end
with a sync flush, so that the raw deflate streams, one after the other, are one valid stream:
what pigz does, without its shared dictionaries. Any gzip reader reads the result; it is a few
per cent larger than one deflate stream. A large label map of a barely trained network (noise)
takes ITK's single-core level-6 deflate several seconds; this takes a fraction of that.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIECE_BYTES = 8 * 1024**2


def _deflate(piece: bytes, level: int, last: bool) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(piece) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_file(source: Path, target: Path, level: int = 1, workers: int | None = None) -> None:
    """Write ``source`` gzipped to ``target`` (zlib releases the GIL: pieces are deflated in
    ``workers`` threads, by default one per core, at most two pieces each in flight)."""
    workers = workers or os.cpu_count() or 1
    size = os.path.getsize(source)
    count = max(1, -(-size // PIECE_BYTES))
    crc, done = 0, 0
    with open(source, "rb") as src, open(target, "wb") as dst, ThreadPoolExecutor(workers) as pool:
        # header: magic, deflate, no flags, no time, "fastest", unknown system
        dst.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff")
        pending = []
        for i in range(count):
            piece = src.read(PIECE_BYTES)
            crc = zlib.crc32(piece, crc)
            done += len(piece)
            pending.append(pool.submit(_deflate, piece, level, i == count - 1))
            if len(pending) >= 2 * workers:
                dst.write(pending.pop(0).result())
        for future in pending:
            dst.write(future.result())
        if done != size:
            raise OSError(f"{source} changed while it was compressed ({done} of {size} bytes read)")
        dst.write(struct.pack("<II", crc, size & 0xFFFFFFFF))
