"""A lean streaming tar reader: the regular files of a tar, in order, from a non-seekable stream.

Python's ``tarfile`` spends ~0.1 ms per member building a ``TarInfo`` (every field parsed, owner
and time included); a shard sample has two to four members and a loader core handles ~400
samples/s, so that alone was ~10% of a core. Here a header costs one checksum and three slices.

Formats read: POSIX ustar (with the 155-byte name prefix), GNU (``L`` long names, base-256 sizes),
pax (``x`` per-member ``path`` and ``size`` records; ``g`` global headers are skipped), and gzip,
bzip2 or xz compression of the whole stream. Directories, links and devices are skipped, and so,
unread, is any file over ``MAX_KEPT_SIZE`` (no image or caption is that large). Anything else that
does not parse raises ``TarFormatError``: a bad checksum or number, a header or data cut short, an
archive that ends without its zero end block.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
from dataclasses import dataclass
from typing import IO, Callable, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_TYPES = (b"0", b"\0", b"7")
DATALESS_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos
GNU_LONG_NAME, GNU_LONG_LINK, PAX_MEMBER, PAX_GLOBAL = b"L", b"K", b"x", b"g"
POSIX_MAGIC = b"ustar\0"
SKIP_CHUNK = 1 << 20  # skipped members are read and dropped in pieces, never held whole
MAX_META_SIZE = 1 << 20  # pax / long-name headers are a few hundred bytes; refuse absurd ones
MAX_KEPT_SIZE = 1 << 28
MAX_SIZE = 1 << 62  # any larger size field is damage, not data

COMPRESSED = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw)), (b"BZh", bz2.BZ2File),
              (b"\xfd7zXZ\0", lzma.LZMAFile))


class TarFormatError(ValueError):
    """The bytes are not (or no longer) a valid tar archive. ``headers_read``: how many valid
    headers (pax and long-name ones included) came before the damage (0: never a tar)."""

    headers_read = 0


class _Prefixed:
    """A read-only stream: ``head`` (bytes already read), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def read(self, count: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(count)
        if count < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:count], self.head[count:]
        return data + (self.stream.read(count - len(data)) if count > len(data) else b"")


def open_decompressed(stream: IO[bytes]) -> IO[bytes]:
    """``stream``, or a decompressing view of it when it starts with a gzip/bzip2/xz magic."""
    head = b""
    while len(head) < 6:  # a pipe may hand over its first bytes in small pieces
        more = stream.read(6 - len(head))
        if not more:
            break
        head += more
    stream = _Prefixed(head, stream)
    for magic, opener in COMPRESSED:
        if head.startswith(magic):
            return opener(stream)
    return stream


@dataclass
class TarPosition:
    """Where the reader is in the (uncompressed) archive, in bytes: ``entry`` is the offset of
    the first header of the file last yielded (pax and long-name headers included: a reader
    seeking there reads the file again), ``end`` the offset just after its data and padding.
    ``seekable`` is False when the stream was compressed (offsets are then not file offsets)."""

    entry: int = 0
    end: int = 0
    seekable: bool = True


def iter_tar_files(stream: IO[bytes], wanted: Callable[[str, int], bool],
                   position: TarPosition | None = None
                   ) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) for each regular file of the tar in ``stream``, in archive order.

    ``data`` is the content when ``wanted(name, size in bytes)`` and the file is at most
    ``MAX_KEPT_SIZE`` bytes, else None (read past unkept, in 1 MiB pieces). Raises
    ``TarFormatError`` where the archive is damaged, after yielding every file before the damage.
    ``position``: updated before each yield; a stream opened at ``position.end`` > 0 is taken to
    be a seek into an uncompressed archive (no compression sniffing at a header).
    """
    position = position if position is not None else TarPosition()
    offset = position.end
    if offset == 0:
        stream = open_decompressed(stream)
        position.seekable = isinstance(stream, _Prefixed)  # not a decompressing view
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    headers_read = 0
    entry = offset
    while True:
        try:
            block = _read_exactly(stream, BLOCK, "header")
            if block == ZERO_BLOCK:
                return
            offset += BLOCK
            name, size, kind = _parse_header(block)
            headers_read += 1
            if kind in (GNU_LONG_NAME, PAX_MEMBER, PAX_GLOBAL, GNU_LONG_LINK):
                if size > MAX_META_SIZE:
                    raise TarFormatError(f"tar {kind.decode()!r} header of {size} bytes (at most "
                                         f"{MAX_META_SIZE}): not a real archive")
                data = _read_member(stream, size, keep=True)
                offset += size + (-size % BLOCK)
                if kind == GNU_LONG_NAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == PAX_MEMBER:
                    pax = _pax_records(data)
                continue
            if b"path" in pax:
                name = pax[b"path"].decode("utf-8", "surrogateescape")
            elif long_name is not None:
                name = long_name
            if b"size" in pax:
                size = _pax_size(pax[b"size"])
            long_name, pax = None, {}
            if kind not in REGULAR_TYPES or name.endswith("/"):
                # As tarfile: these types never have data (an old-style directory is a regular
                # entry whose name ends in "/"); unknown types skip their stated size.
                dataless = kind in DATALESS_TYPES or name.endswith("/")
                skipped = 0 if dataless else size
                _read_member(stream, skipped, keep=False)
                offset += skipped + (-skipped % BLOCK)
                entry = offset
                continue
            data = _read_member(stream, size, size <= MAX_KEPT_SIZE and wanted(name, size))
            offset += size + (-size % BLOCK)
        except TarFormatError as error:
            error.headers_read = headers_read
            raise
        position.entry, position.end = entry, offset
        entry = offset
        yield name, data


def _parse_header(block: bytes) -> tuple[str, int, bytes]:
    """(name, data size in bytes, type flag) of one 512-byte header block."""
    try:
        stored = _number(block[148:156])
    except TarFormatError:
        stored = -1
    # The checksum counts its own field as eight spaces; old tars summed signed bytes.
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block):
        raise TarFormatError("tar header checksum mismatch: not a tar, or a damaged one")
    name = block[:100].split(b"\0", 1)[0]
    kind = block[156:157]
    if block[257:263] == POSIX_MAGIC and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _number(block[124:136]), kind


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field[0] == 0x80:
        value = int.from_bytes(field[1:], "big")
        if value > MAX_SIZE:
            raise TarFormatError(f"number {value} in a tar header is beyond any real size")
        return value
    if field[0] & 0x80:
        raise TarFormatError(f"negative or unsupported binary number in a tar header: {field!r}")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad number in a tar header: {field!r}") from None


def _pax_size(text: bytes) -> int:
    if not text.isdigit() or int(text) > MAX_SIZE:
        raise TarFormatError(f"bad pax size record {text[:40]!r}")
    return int(text)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``b"27 path=dir/name.jpg\\n"`` records -> {b"path": b"dir/name.jpg"}."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise TarFormatError("malformed pax header record") from None
        if space < 0 or length <= 0 or position + length > len(data):
            raise TarFormatError("malformed pax header record")
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key] = value
        position += length
    return records


def _read_member(stream: IO[bytes], size: int, keep: bool) -> bytes | None:
    """The member's data when ``keep`` (else dropped), and its padding to a whole block."""
    padding = -size % BLOCK
    if keep:
        data = _read_exactly(stream, size, "data")
        _read_exactly(stream, padding, "data")
        return data
    _skip(stream, size + padding)
    return None


def _read_exactly(stream: IO[bytes], count: int, what: str) -> bytes:
    data = stream.read(count) if count else b""
    if len(data) != count:
        if what == "header" and not data:
            raise TarFormatError("tar ends without its end-of-archive blocks")
        raise TarFormatError(f"tar {what} cut at {len(data)} of {count} bytes")
    return data


def _skip(stream: IO[bytes], count: int) -> None:
    while count > 0:
        dropped = len(stream.read(min(count, SKIP_CHUNK)))
        if dropped == 0:
            raise TarFormatError(f"tar data cut with {count} bytes still to come")
        count -= dropped
