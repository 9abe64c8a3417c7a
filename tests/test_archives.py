"""Archive extraction: good archives come out whole, malicious ones are refused and leave nothing."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from dvm_core.archives import ArchiveError, extract_archive

LIMITS = {"max_total_bytes": 10_000_000, "max_files": 100}
DATASET = {
    "train/cat/1.jpg": b"cat one" * 50,
    "train/cat/2.jpg": b"cat two" * 50,
    "train/dog/1.jpg": b"dog one" * 50,
    "val/dog/3.jpg": b"",
    "labels.txt": b"cat\ndog\n",
}


# --- builders ------------------------------------------------------------------------------

def make_zip(path: Path, members: dict[str, bytes], *, dirs: tuple[str, ...] = (),
             compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for d in dirs:
            zf.writestr(d.rstrip("/") + "/", b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def tar_special(name: str, kind: bytes, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def patch_zip_sizes(data: bytes, *, uncompressed: int | None = None, flags: int | None = None) -> bytes:
    """Rewrite the first member's sizes/flags in both its local and central headers."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    central = out.find(b"PK\x01\x02")
    if uncompressed is not None:
        struct.pack_into("<I", out, local + 22, uncompressed)
        struct.pack_into("<I", out, central + 24, uncompressed)
    if flags is not None:
        struct.pack_into("<H", out, local + 6, flags)
        struct.pack_into("<H", out, central + 8, flags)
    return bytes(out)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(archive: Path, target: Path, match: str, **limits):
    with pytest.raises(ArchiveError, match=match) as info:
        extract_archive(archive, target, **{**LIMITS, **limits})
    assert not target.exists(), f"left behind: {list(target.rglob('*'))}"
    return info.value


# --- good archives -------------------------------------------------------------------------

def test_zip_with_class_folders(tmp_path):
    archive = make_zip(tmp_path / "data.zip", DATASET, dirs=("train", "train/cat", "val"))
    files = extract_archive(archive, tmp_path / "out", **LIMITS)
    assert tree(tmp_path / "out") == DATASET
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == list(DATASET)
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o7000 == 0 for f in files)


@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w", "tar"), ("w:bz2", "tar.bz2"),
                                         ("w:xz", "tar.xz")])
def test_tar_with_class_folders(tmp_path, mode, suffix):
    dirs = [tar_special(d, tarfile.DIRTYPE, mode=0o755) for d in (".", "./train", "./train/cat")]
    archive = make_tar(tmp_path / f"data.{suffix}",
                       dirs + [(f"./{name}", data) for name, data in DATASET.items()], mode)
    files = extract_archive(archive, tmp_path / "out", **LIMITS)
    assert tree(tmp_path / "out") == DATASET
    assert len(files) == len(DATASET)


def test_recognised_by_content_not_name(tmp_path):
    archive = make_zip(tmp_path / "blob-without-extension", {"a.txt": b"a"})
    assert tree(Path(extract_archive(archive, tmp_path / "out", **LIMITS)[0]).parent) == {"a.txt": b"a"}
    other = tmp_path / "notes.zip"
    other.write_bytes(b"just text, not an archive" * 30)
    refused(other, tmp_path / "out2", "not a zip or tar archive")


def test_windows_backslash_names(tmp_path):
    archive = make_zip(tmp_path / "win.zip", {"train\\cat\\1.jpg": b"x"})
    extract_archive(archive, tmp_path / "out", **LIMITS)
    assert tree(tmp_path / "out") == {"train/cat/1.jpg": b"x"}


# --- paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,match", [
    ("../x", r"'\.\.'"), ("train/../../x", r"'\.\.'"), ("..\\x", r"'\.\.'"),
    ("/etc/x", "absolute path"), ("C:/x", "absolute path"), ("\\\\server\\x", "absolute path"),
])
def test_zip_path_traversal(tmp_path, name, match):
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"fine", name: b"pwned"})
    error = refused(archive, tmp_path / "out", match)
    assert repr(name) in str(error)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name,match", [("../x", r"'\.\.'"), ("/etc/x", "absolute path"),
                                        ("a/../../x", r"'\.\.'")])
def test_tar_path_traversal(tmp_path, name, match):
    archive = make_tar(tmp_path / "evil.tar.gz", [("ok.txt", b"fine"), (name, b"pwned")])
    refused(archive, tmp_path / "out", match)
    assert not (tmp_path / "x").exists()


def test_existing_symlink_in_target_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "link").symlink_to(outside)
    archive = make_zip(tmp_path / "a.zip", {"link/x": b"pwned"})
    with pytest.raises(ArchiveError, match="outside the target folder"):
        extract_archive(archive, target, **LIMITS)
    assert list(outside.iterdir()) == []
    assert (target / "link").is_symlink()  # what was there before is left alone


# --- member types --------------------------------------------------------------------------

@pytest.mark.parametrize("member,match", [
    (tar_special("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink"),
    (tar_special("hard", tarfile.LNKTYPE, linkname="ok.txt"), "hardlink"),
    (tar_special("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "device file"),
    (tar_special("blk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device file"),
    (tar_special("fifo", tarfile.FIFOTYPE), "FIFO"),
])
def test_tar_special_members(tmp_path, member, match):
    archive = make_tar(tmp_path / "evil.tar", [("ok.txt", b"fine"), member], "w")
    error = refused(archive, tmp_path / "out", match)
    assert repr(member.name) in str(error)


def test_zip_symlink(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    refused(path, tmp_path / "out", "'link' is a symlink")


def test_zip_encrypted_member(tmp_path):
    data = make_zip(tmp_path / "plain.zip", {"secret.txt": b"x" * 100}).read_bytes()
    archive = tmp_path / "enc.zip"
    archive.write_bytes(patch_zip_sizes(data, flags=0x1))
    refused(archive, tmp_path / "out", "'secret.txt' is encrypted")


# --- limits --------------------------------------------------------------------------------

def test_too_many_members(tmp_path):
    members = {f"f{i}.txt": b"x" for i in range(11)}
    refused(make_zip(tmp_path / "many.zip", members), tmp_path / "out", "more than 10 members", max_files=10)
    refused(make_tar(tmp_path / "many.tgz", list(members.items())), tmp_path / "out", "more than 10 members",
            max_files=10)
    extract_archive(make_zip(tmp_path / "ten.zip", dict(list(members.items())[:10])), tmp_path / "ok",
                    **{**LIMITS, "max_files": 10})


def test_declared_size_above_limit_refused_before_extracting(tmp_path):
    members = {"a.bin": os.urandom(600), "b.bin": os.urandom(600)}
    refused(make_zip(tmp_path / "big.zip", members), tmp_path / "out", "more than 1000 bytes",
            max_total_bytes=1000)
    refused(make_tar(tmp_path / "big.tgz", list(members.items())), tmp_path / "out", "more than 1000 bytes",
            max_total_bytes=1000)


def test_tar_declaring_a_huge_member_is_refused_from_its_header(tmp_path):
    """A 1 TB member (only its header is in the file): refused without reading any data."""
    info = tarfile.TarInfo("huge.bin")
    info.size = 10 ** 12
    archive = tmp_path / "huge.tar"
    archive.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096)
    refused(archive, tmp_path / "out", "more than")


def test_zip_declaring_a_huge_member(tmp_path):
    data = make_zip(tmp_path / "plain.zip", {"a.bin": b"x" * 100}).read_bytes()
    archive = tmp_path / "huge.zip"
    archive.write_bytes(patch_zip_sizes(data, uncompressed=0xFFFF0000))
    refused(archive, tmp_path / "out", "more than 10000000 bytes")


def test_zip_understating_its_size(tmp_path):
    """The header says 1000 bytes, the member holds 200 000: the declared total passes the
    check before extraction; extraction stops at the declared size and the archive is refused."""
    data = make_zip(tmp_path / "plain.zip", {"a.bin": os.urandom(200_000)}).read_bytes()
    archive = tmp_path / "liar.zip"
    archive.write_bytes(patch_zip_sizes(data, uncompressed=1000))
    refused(archive, tmp_path / "out", "corrupt or truncated", max_total_bytes=100_000)


def test_member_growing_past_its_header_is_stopped_while_writing(tmp_path, monkeypatch):
    """Only the count during extraction can catch a reader that yields more than the header
    says (CPython's zipfile itself stops at the declared size; this guards against any reader
    that does not)."""
    archive = make_zip(tmp_path / "a.zip", {"first.bin": b"1" * 100, "second.bin": b"2" * 100})
    written = []

    def lying_open(self, info, *args, **kwargs):
        written.append(info.filename)
        return io.BytesIO(b"z" * 5_000_000)

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    refused(archive, tmp_path / "out", "'first.bin' is larger than its header says", max_total_bytes=1000)
    assert written == ["first.bin"]


def test_zip_bomb_by_ratio(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 5_000_000})
    assert bomb.stat().st_size < 10_000
    refused(bomb, tmp_path / "out", "'zeros.bin' expands .* times .*zip bomb")
    extract_archive(bomb, tmp_path / "allowed", **LIMITS, max_ratio=None)
    assert (tmp_path / "allowed" / "zeros.bin").stat().st_size == 5_000_000


def test_tar_gz_bomb_by_ratio(tmp_path):
    bomb = make_tar(tmp_path / "bomb.tgz", [("zeros.bin", b"\0" * 5_000_000)])
    refused(bomb, tmp_path / "out", "zip bomb")


def test_small_compressible_files_are_fine(tmp_path):
    archive = make_zip(tmp_path / "text.zip", {"a.csv": b"1,2,3\n" * 50_000})  # 300 KB, ratio > 200
    extract_archive(archive, tmp_path / "out", **LIMITS)


# --- corrupt archives ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.xz"])
def test_truncated(tmp_path, kind):
    members = {"train/a.bin": os.urandom(50_000), "train/b.bin": os.urandom(50_000)}
    if kind == "zip":
        good = make_zip(tmp_path / "good.zip", members)
    else:
        good = make_tar(tmp_path / f"good.{kind}", list(members.items()), "w:" + kind.split(".")[1])
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        archive = tmp_path / f"cut.{kind}"
        archive.write_bytes(data[:cut])
        refused(archive, tmp_path / "out", "corrupt or truncated archive")


def test_corrupt_crc(tmp_path):
    data = bytearray(make_zip(tmp_path / "good.zip", {"a.txt": b"A" * 1000}, compression=zipfile.ZIP_STORED)
                     .read_bytes())
    position = data.find(b"A" * 1000) + 500
    data[position] = ord("B")
    archive = tmp_path / "crc.zip"
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path / "out", "corrupt or truncated archive")


def test_failure_midway_removes_what_was_extracted(tmp_path):
    """Two good members are written, the third is corrupt: the target is left as it was."""
    members = {"a/1.bin": os.urandom(1000), "a/2.bin": os.urandom(1000), "b/3.bin": b"C" * 1000}
    data = bytearray(make_zip(tmp_path / "good.zip", members, compression=zipfile.ZIP_STORED).read_bytes())
    data[data.find(b"C" * 1000) + 10] = ord("D")
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("was here before")
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(archive, target, **LIMITS)
    assert tree(target) == {"keep.txt": b"was here before"}
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_duplicate_and_overwrite(tmp_path):
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", b"first")
        with pytest.warns(UserWarning):
            zf.writestr("a.txt", b"second")
    refused(path, tmp_path / "out", "'a.txt' appears twice")
    target = tmp_path / "existing"
    target.mkdir()
    (target / "a.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="overwrite"):
        extract_archive(make_zip(tmp_path / "one.zip", {"a.txt": b"theirs"}), target, **LIMITS)
    assert (target / "a.txt").read_text() == "mine"


def test_tar_gz_with_a_wrong_gzip_crc(tmp_path):
    """tar itself has no data checksums: the gzip CRC at the very end of the stream is checked."""
    data = bytearray(make_tar(tmp_path / "good.tgz", [("a.bin", os.urandom(5000))]).read_bytes())
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    archive = tmp_path / "crc.tgz"
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path / "out", "corrupt or truncated archive")


def test_cancellation_removes_what_was_extracted(tmp_path):
    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Stop()

    archive = make_zip(tmp_path / "a.zip", {"a/1.bin": b"1", "a/2.bin": b"2", "a/3.bin": b"3"})
    with pytest.raises(Stop):
        extract_archive(archive, tmp_path / "out", **LIMITS, check_cancelled=check)
    assert not (tmp_path / "out").exists()


def _huge_header_tar(path: Path, typeflag: bytes, declared: int) -> Path:
    """A .tar.gz whose first header declares `declared` bytes of GNU long name (typeflag L) or
    PAX attributes (x): a few hundred KB compressed, a gigabyte once read whole."""
    import gzip
    header = bytearray(512)
    name = b"././@LongLink" if typeflag == b"L" else b"./PaxHeaders/x"
    header[0:len(name)] = name
    header[100:108] = b"0000644\x00"
    header[108:116] = header[116:124] = b"0000000\x00"
    header[124:136] = f"{declared:011o}\x00".encode()
    header[136:148] = b"00000000000\x00"
    header[156:157] = typeflag
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(bytes(header))
        zeros = b"a" * (1 << 20)
        for _ in range(declared >> 20):
            f.write(zeros)
    return path


@pytest.mark.parametrize("typeflag", [b"L", b"x"], ids=["gnu-long-name", "pax-header"])
def test_a_tar_header_declaring_a_gigabyte_is_refused_without_reading_it(tmp_path, typeflag):
    import subprocess
    import sys
    bomb = _huge_header_tar(tmp_path / "bomb.tar.gz", typeflag, 256 << 20)
    assert bomb.stat().st_size < 2 << 20
    code = ("import sys\n"
            "from dvm_core.archives import ArchiveError, extract_archive\n"
            f"try:\n    extract_archive({str(bomb)!r}, {str(tmp_path / 'out')!r}, max_total_bytes=1 << 30, "
            "max_files=1000)\n"
            "except ArchiveError as exc:\n    print('refused:', exc)\n"
            # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('peak_mb', int(hwm) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: a tar header declares" in out.stdout, out.stdout + out.stderr
    peak = int(out.stdout.split("peak_mb")[1])
    assert peak < 150, out.stdout   # the header's 256 MiB were never read
