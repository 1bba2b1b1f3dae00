"""The lean tar reader yields what Python's tarfile reads from the same archive (regular files, in
order, names resolved through ustar prefixes, GNU long names and pax records), reads no data it was
not asked for, and raises TarFormatError where tarfile would find the archive damaged."""
import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from internimage.data.tar_stream import TarFormatError, _number, iter_tar_files


def archive(fmt: int, members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar in ``fmt``; a member whose content is a str is a directory (``"dir"``) or a symlink
    to that target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000.25  # a float mtime makes PAX writers add a pax header
            if content == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def tarfile_view(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def ours(data: bytes, wanted=lambda name, size: True) -> list[tuple[str, bytes | None]]:
    return list(iter_tar_files(io.BufferedReader(io.BytesIO(data)), wanted))


MEMBERS = [
    ("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("000001.cls", b"17"),
    ("000002.txt", b""),  # empty file: a header and no data block
    ("folder", "dir"),
    ("folder/000003.json", b'{"caption": "x"}' * 40),
    ("link.jpg", "000001.jpg"),
    ("d" * 90 + "/" + "e" * 60 + ".jpg", b"prefix or long name"),  # > 100 characters
    ("f" * 120 + "/" + "g" * 150 + ".txt", b"only a long-name header holds this"),  # > 256
    ("caf\u00e9/\u00fcber.txt", "\u00e9t\u00e9".encode()),  # non-ASCII names
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_regular_files_and_names_match_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [
        m for m in MEMBERS if len(m[0]) < 200]  # ustar itself cannot store the longest name
    data = archive(fmt, members)
    assert ours(data) == tarfile_view(data)
    assert [name for name, _ in ours(data)][:2] == ["000001.jpg", "000001.cls"]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_archives_are_read_through(compress):
    data = archive(tarfile.PAX_FORMAT, MEMBERS)
    assert ours(compress(data)) == tarfile_view(data)


def test_unwanted_members_are_skipped_unread():
    data = archive(tarfile.GNU_FORMAT, MEMBERS)
    result = ours(data, wanted=lambda name, size: name.endswith(".cls"))
    assert [content for name, content in result if name.endswith(".cls")] == [b"17"]
    assert all(content is None for name, content in result if not name.endswith(".cls"))


@pytest.mark.parametrize("damage,message,complete,headers", [
    (lambda d: d[:700], "data cut", 0, 1),
    (lambda d: d[:512 + 100], "data cut", 0, 1),
    (lambda d: d[:3072 + 1], "data cut", 1, 2),  # inside the second member's data
    (lambda d: d[:100], "header cut", 0, 0),
    (lambda d: d.rstrip(b"\0") + bytes(-len(d.rstrip(b"\0")) % 512), "end-of-archive", 2, 2),
    (lambda d: d[:148] + b"7777777\0" + d[156:], "not a tar", 0, 0),
    (lambda d: b"not a tar archive " * 60, "not a tar", 0, 0),
])
def test_damage_raises_after_every_complete_file_before_it(damage, message, complete, headers):
    data = archive(tarfile.USTAR_FORMAT, MEMBERS[:2])
    assert len(data) >= 3584  # header, 1794 bytes padded, header, 2 bytes padded, end blocks
    seen = []
    with pytest.raises(TarFormatError, match=message) as caught:
        for name, _ in iter_tar_files(io.BytesIO(damage(data)), lambda name, size: True):
            seen.append(name)
    assert seen == [name for name, _ in MEMBERS[:complete]]
    assert caught.value.headers_read == headers  # valid headers before the damage


def test_old_style_directories_are_skipped_and_oversized_files_left_unread(monkeypatch):
    from internimage.data import tar_stream

    data = archive(tarfile.USTAR_FORMAT, [("000001.jpg", b"x" * 600), ("000001.cls", b"3")])
    header = bytearray(data[:512])  # a v7-style directory: a regular-file type, name ending "/"
    header[:100] = b"photos/".ljust(100, b"\0")
    header[124:136] = b"00000000000\0"
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    monkeypatch.setattr(tar_stream, "MAX_KEPT_SIZE", 512)
    assert ours(bytes(header) + data) == [("000001.jpg", None), ("000001.cls", b"3")]


@pytest.mark.parametrize("record", [b"size=abc", b"size=-1", b"size=99999999999999999999999"])
def test_bad_pax_sizes_are_format_errors(record):
    line = b"%d %s\n" % (len(record) + 4, record)
    assert len(line) == len(record) + 4  # the length counts itself (two digits here)
    data = archive(tarfile.USTAR_FORMAT, [("a.txt", b"hello")])
    pax = bytearray(512)
    pax[:9] = b"PaxHeader"
    pax[124:136] = b"%011o\0" % len(line)
    pax[156:157] = b"x"
    pax[257:263] = b"ustar\0"
    pax[148:156] = b"        "
    pax[148:156] = b"%06o\0 " % sum(pax)
    broken = bytes(pax) + line.ljust(512, b"\0") + data
    with pytest.raises(TarFormatError, match="bad pax size"):
        ours(broken)


def test_an_absurd_long_name_header_is_refused_before_it_is_read():
    block = bytearray(512)
    block[:13] = b"././@LongLink"
    block[124:136] = b"%011o\0" % (1 << 32)  # a 4 GiB "name"
    block[156:157] = b"L"
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    assert len(block) == 512
    with pytest.raises(TarFormatError, match="header of 4294967296 bytes"):
        ours(bytes(block) + bytes(1024))


def test_numbers_in_octal_and_gnu_base_256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"     17 ") == 0o17
    assert _number(b"\0" * 8) == 0
    assert _number(b"\x80" + (12 * 2**33).to_bytes(11, "big")) == 12 * 2**33  # > 8 GiB sizes
    with pytest.raises(TarFormatError):
        _number(b"\xff" * 12)
    with pytest.raises(TarFormatError, match="beyond any real size"):
        _number(b"\x80" + b"\xff" * 11)
    with pytest.raises(TarFormatError):
        _number(b"12x4\0\0\0\0")
