"""The one place archives are unpacked: zip and tar (plain, .gz/.tgz, .bz2, .xz), safely.

Archives come from customers, so every member is checked before a byte is written, and the
limits hold while writing too:

- no absolute paths, no ``..`` components, nothing that resolves outside `target_dir`
  (backslashes count as separators, as Windows zip tools write them);
- no symlinks, hardlinks, device files, FIFOs or other special members; no encrypted zip
  members; only the usual zip compression methods (stored, deflate, bzip2, lzma);
- at most `max_files` members (files and folders), and at most `max_total_bytes` declared in
  all, both checked before extracting;
- while extracting, the bytes actually written are counted (a crafted header can understate a
  member's size), and extraction stops as soon as a member grows past its declared size or the
  total passes `max_total_bytes`;
- zip bombs: a member (or the archive as a whole) expanding more than `max_ratio` times is
  refused, for sizes above `RATIO_MIN_BYTES` (small files compress as they like);
- a member never overwrites a file (duplicate names in one archive are refused too);
- a corrupt or truncated archive (bad CRC, cut-off stream) is an `ArchiveError`.

Members are streamed one by one (never ``extractall``); extracted files get mode 0644 and
folders 0755, whatever the archive says. On any error, everything extracted so far is removed.
The format is recognised from the file's first bytes, not its name.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import struct
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

__all__ = ["ArchiveError", "extract_archive", "archive_format", "RATIO_MIN_BYTES", "NUMPY_HEADER_LOCK"]

RATIO_MIN_BYTES = 1 << 20

#: Held while numpy reads an .npy header (``np.load``, an .npz member,
#: ``np.lib.format.read_array_header_*``). numpy parses the header with ``ast.literal_eval``, and
#: CPython before 3.11.8 (3.12.2 on 3.12) keeps the AST constructor's recursion depth in state
#: every thread shares: two jobs of one worker parsing at once (a thread switch inside it, which a
#: garbage collection running a finaliser allows) fail with "SystemError: AST constructor
#: recursion depth mismatch" (python/cpython#106905). A plugin reading .npy/.npz files in a job's
#: thread takes it; `dvm doctor` warns on those Pythons, where other libraries' parsing stays
#: unguarded.
NUMPY_HEADER_LOCK = threading.RLock()
CHUNK = 1 << 20
MAX_TRAILING_BYTES = 1 << 20
MAX_TAR_HEADER_BYTES = 64 << 10   # a GNU long name or a PAX header; tarfile reads one whole
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_CORRUPT = "corrupt or truncated archive"


class ArchiveError(Exception):
    """An archive that cannot be extracted safely; the message is meant for the customer."""


def archive_format(path: str | os.PathLike) -> str | None:
    """``"zip"``, ``"tar"`` (any compression) or None, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def extract_archive(path: str | os.PathLike, target_dir: str | os.PathLike, *, max_total_bytes: int,
                    max_files: int, max_ratio: float | None = 200.0,
                    check_cancelled: Callable[[], None] | None = None) -> list[Path]:
    """Extract the zip or tar archive at `path` into `target_dir` (created if needed) and return
    the paths of the files extracted, in archive order.

    :param max_total_bytes: the most bytes the extracted files may hold in all.
    :param max_files: the most members (files and folders) the archive may have.
    :param max_ratio: the most a member, or the archive as a whole, may expand (uncompressed /
        compressed size) when above `RATIO_MIN_BYTES`; None: no ratio check.
    :param check_cancelled: called between chunks; whatever it raises stops the extraction
        (and what was extracted is removed).
    :raises ArchiveError: with a message naming the offending member.
    """
    path = Path(path)
    kind = archive_format(path)
    if kind is None:
        raise ArchiveError("not a zip or tar archive")
    extractor = _Extractor(Path(target_dir), max_total_bytes=max_total_bytes, max_files=max_files,
                           max_ratio=max_ratio, archive_size=path.stat().st_size,
                           check_cancelled=check_cancelled)
    try:
        if kind == "zip":
            _extract_zip(path, extractor)
        else:
            _extract_tar(path, extractor)
    except ArchiveError:
        extractor.cleanup()
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            ValueError, struct.error) as exc:
        extractor.cleanup()
        raise ArchiveError(f"{_CORRUPT} ({exc})") from exc
    except OSError as exc:
        extractor.cleanup()
        if exc.errno is None:  # gzip/bz2 data errors carry no errno
            raise ArchiveError(f"{_CORRUPT} ({exc})") from exc
        raise ArchiveError(f"cannot extract the archive: {exc.strerror or exc}") from exc
    except BaseException:
        extractor.cleanup()
        raise
    return extractor.files


class _Extractor:
    """Writes members under `target`, keeping the limits and a record of what it created."""

    def __init__(self, target: Path, *, max_total_bytes: int, max_files: int,
                 max_ratio: float | None, archive_size: int, check_cancelled):
        self.target = target
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files
        self.max_ratio = max_ratio
        self.archive_size = max(1, archive_size)
        self.check_cancelled = check_cancelled
        self.written = 0
        self.files: list[Path] = []
        self.created_dirs: list[Path] = []
        self.seen: set[str] = set()
        self._make_dir_chain(target)
        self.root = target.resolve()

    # --- checks ----------------------------------------------------------------------------
    def check_counts(self, count: int, declared_total: int) -> None:
        if count > self.max_files:
            raise ArchiveError(f"the archive has more than {self.max_files} members")
        if declared_total > self.max_total_bytes:
            raise ArchiveError(f"the archive holds more than {self.max_total_bytes} bytes "
                               f"when extracted (it declares {declared_total} so far)")

    def check_overall_ratio(self, declared_total: int) -> None:
        if self.max_ratio is not None and declared_total > RATIO_MIN_BYTES \
                and declared_total / self.archive_size > self.max_ratio:
            raise ArchiveError(f"the archive expands {declared_total / self.archive_size:.0f} times "
                               f"(more than {self.max_ratio:g}): refused as a zip bomb")

    def relative(self, name: str) -> PurePosixPath | None:
        """The checked relative path of member `name`, or None for the archive's root."""
        shown = name[:200]
        if "\0" in name:
            raise ArchiveError(f"member {shown!r} has a NUL character in its name")
        normal = name.replace("\\", "/")
        if normal.startswith("/") or (len(normal) >= 2 and normal[1] == ":" and normal[0].isalpha()):
            raise ArchiveError(f"member {shown!r} has an absolute path")
        parts = [p for p in normal.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveError(f"member {shown!r} has a '..' in its path")
        if not parts:
            return None
        relative = PurePosixPath(*parts)
        resolved = (self.root / relative).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ArchiveError(f"member {shown!r} would be written outside the target folder")
        return relative

    # --- writing ---------------------------------------------------------------------------
    def _make_dir_chain(self, directory: Path) -> None:
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_dirs.append(d)

    def make_dir(self, name: str, relative: PurePosixPath | None) -> None:
        if relative is None:
            return
        directory = self.root / relative
        if directory.exists() and not directory.is_dir():
            raise ArchiveError(f"member {name[:200]!r} is a folder where a file already is")
        self._make_dir_chain(directory)
        if not directory.resolve().is_relative_to(self.root):
            raise ArchiveError(f"member {name[:200]!r} would be written outside the target folder")

    def write_file(self, name: str, relative: PurePosixPath | None, declared_size: int,
                   source: Callable[[], IO[bytes]]) -> None:
        shown = name[:200]
        if relative is None:
            raise ArchiveError(f"member {shown!r} is a file without a name")
        key = relative.as_posix()
        if key in self.seen:
            raise ArchiveError(f"member {shown!r} appears twice in the archive")
        self.seen.add(key)
        destination = self.root / relative
        self.make_dir(name, relative.parent if relative.parent != PurePosixPath(".") else None)
        if not destination.parent.resolve().is_relative_to(self.root):
            raise ArchiveError(f"member {shown!r} would be written outside the target folder")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(destination, flags, 0o644)
        except FileExistsError:
            raise ArchiveError(f"member {shown!r} would overwrite an existing file") from None
        self.files.append(destination)
        member_written = 0
        with os.fdopen(fd, "wb") as out, source() as reader:
            while True:
                block = reader.read(CHUNK)
                if not block:
                    break
                member_written += len(block)
                self.written += len(block)
                if member_written > declared_size:
                    raise ArchiveError(f"member {shown!r} is larger than its header says "
                                       f"({declared_size} bytes): refused")
                if self.written > self.max_total_bytes:
                    raise ArchiveError(f"the archive holds more than {self.max_total_bytes} bytes "
                                       f"when extracted (stopped at member {shown!r})")
                out.write(block)
                if self.check_cancelled is not None:
                    self.check_cancelled()
        if member_written != declared_size:
            raise ArchiveError(f"{_CORRUPT}: member {shown!r} has {member_written} bytes, "
                               f"not the {declared_size} its header says")

    def cleanup(self) -> None:
        for f in reversed(self.files):
            try:
                f.unlink()
            except OSError:
                pass
        for d in reversed(self.created_dirs):
            shutil.rmtree(d, ignore_errors=True)
        self.files = []



# --- zip -----------------------------------------------------------------------------------

def _zip_kind(info: zipfile.ZipInfo) -> str:
    """``"dir"``, ``"file"`` or a description of the special kind of a zip member."""
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # made on Unix: the mode says what it is
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFLNK:
            return "a symlink"
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            return "a device file"
        if fmt == stat.S_IFIFO:
            return "a FIFO"
        if fmt == stat.S_IFSOCK:
            return "a socket"
        if fmt == stat.S_IFDIR:
            return "dir"
        if fmt not in (0, stat.S_IFREG):
            return "a special file"
    return "dir" if info.is_dir() else "file"


def _extract_zip(path: Path, ex: _Extractor) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        ex.check_counts(len(infos), 0)
        declared = 0
        planned = []
        for info in infos:
            name = info.filename
            kind = _zip_kind(info)
            if kind not in ("dir", "file"):
                raise ArchiveError(f"member {name[:200]!r} is {kind}: refused")
            if info.flag_bits & 0x1 or info.flag_bits & 0x40:
                raise ArchiveError(f"member {name[:200]!r} is encrypted: send the archive "
                                   "without a password")
            relative = ex.relative(name)
            if kind == "file":
                if info.compress_type not in _ZIP_METHODS:
                    raise ArchiveError(f"member {name[:200]!r} uses an unsupported compression "
                                       f"method ({info.compress_type})")
                declared += info.file_size
                ex.check_counts(len(infos), declared)
                if ex.max_ratio is not None and info.file_size > RATIO_MIN_BYTES:
                    ratio = info.file_size / max(1, info.compress_size)
                    if ratio > ex.max_ratio:
                        raise ArchiveError(f"member {name[:200]!r} expands {ratio:.0f} times "
                                           f"(more than {ex.max_ratio:g}): refused as a zip bomb")
            planned.append((info, kind, relative))
        ex.check_overall_ratio(declared)
        for info, kind, relative in planned:
            if kind == "dir":
                ex.make_dir(info.filename, relative)
            else:
                ex.write_file(info.filename, relative, info.file_size,
                              lambda info=info: zf.open(info))


# --- tar -----------------------------------------------------------------------------------

def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "a symlink"
    if member.islnk():
        return "a hardlink"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return "a special file"


def _tar_members(tf: tarfile.TarFile, ex: _Extractor) -> Iterator[tarfile.TarInfo]:
    """Read the members' headers one by one, checking the limits after each (a giant member
    is refused from its header, before the reader skips over its data)."""
    count = 0
    declared = 0
    while True:
        member = tf.next()
        if member is None:
            return
        count += 1
        kind = _tar_kind(member)
        if kind not in ("dir", "file"):
            raise ArchiveError(f"member {member.name[:200]!r} is {kind}: refused")
        ex.relative(member.name)
        if kind == "file":
            declared += member.size
        ex.check_counts(count, declared)
        yield member


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name/long-link record and a PAX header whole into memory before
    any limit of ours is looked at: a 130 KB .tar.gz declaring a 1 GiB name took 1.2 GiB. Refuse
    such a header by its declared size before reading it."""

    def _check_header_size(self):
        if self.size > MAX_TAR_HEADER_BYTES:
            raise ArchiveError(f"a tar header declares {self.size} bytes of names or attributes; at most "
                               f"{MAX_TAR_HEADER_BYTES} are read")

    def _proc_gnulong(self, tarfile):
        self._check_header_size()
        return super()._proc_gnulong(tarfile)

    def _proc_pax(self, tarfile):
        self._check_header_size()
        return super()._proc_pax(tarfile)


def _open_tar(path: Path) -> tarfile.TarFile:
    return tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)


def _extract_tar(path: Path, ex: _Extractor) -> None:
    # First pass: headers only (limits, names, types), before anything is written.
    with _open_tar(path) as tf:
        declared = 0
        for member in _tar_members(tf, ex):
            if member.isreg():
                declared += member.size
        ex.check_overall_ratio(declared)
    # Second pass: stream each member out.
    with _open_tar(path) as tf:
        for member in _tar_members(tf, ex):
            relative = ex.relative(member.name)
            if member.isdir():
                ex.make_dir(member.name, relative)
            else:
                ex.write_file(member.name, relative, member.size,
                              lambda member=member: _tar_reader(tf, member))
        # Read on to the end of the (compressed) stream: that is where gzip keeps its CRC, and
        # where a cut-off .tar.gz/.xz shows; a little padding is normal, a lot is refused.
        trailing = 0
        while block := tf.fileobj.read(CHUNK):
            trailing += len(block)
            if trailing > MAX_TRAILING_BYTES:
                raise ArchiveError("the archive has unexpected data after its end")


def _tar_reader(tf: tarfile.TarFile, member: tarfile.TarInfo):
    reader = tf.extractfile(member)
    if reader is None:  # not a regular file: cannot happen after _tar_kind
        raise ArchiveError(f"member {member.name[:200]!r} has no data")
    return reader
