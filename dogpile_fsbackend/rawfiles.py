"""Raw values: taking a caller's file into the cache, and handing cached bytes back.

A value is stored as the bytes its ``read()`` returns, in constant memory.
The kernel copies between descriptors (``os.copy_file_range``, else
``os.sendfile``) only when the descriptor's bytes *are* the object's bytes: a
plain binary file or its buffered wrapper over a regular file, a
``NamedTemporaryFile``.  Everything else (``gzip``/``bz2``/``lzma`` objects,
whose descriptor holds compressed bytes; ``/proc`` files, whose size reads 0;
pipes, sockets, ``io.BytesIO``) is read through ``read()`` in chunks; a
non-blocking stream with no data ready is an error, never a shorter value.
``file_movable`` turns the copy into a rename when a named file lives on the
cache's filesystem (:func:`movable`), done under the shard lock straight to the
entry's data name.  Copying stops as soon as the value can no longer fit
(:class:`TooLarge`).  The creator's file position is recorded so that cached
reads start where the creator left off.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mimetypes
import os
import stat
import tempfile
from typing import IO, Any, NamedTuple
from urllib.parse import quote

from . import layout
from .files import open_quietly
from .records import RawMeta

_KERNEL_COPY_FALLBACK = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
)
_COPY_CHUNK = 1 << 20


class TooLarge(Exception):
    """The value has more than ``limit`` bytes (``size`` were seen before stopping)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


ACCEPTED = (
    "a readable binary file-like object: open(path, 'rb'), "
    "tempfile.NamedTemporaryFile(), os.fdopen(fd, 'rb'), io.BytesIO(...), "
    "optionally wrapped in dogpile_fsbackend.CachedFile(fileobj, filename=..., content_type=...)"
)


class CachedFile:
    """A raw value with a file name and content type to keep beside its bytes.

    ``content_type`` defaults to a guess from ``filename`` (``mimetypes``).
    """

    def __init__(
        self, fileobj: IO[bytes], filename: str | None = None, content_type: str | None = None
    ) -> None:
        self.fileobj = fileobj
        self.filename = filename
        if content_type is None and filename:
            content_type = mimetypes.guess_type(filename)[0]
        self.content_type = content_type

    def __getattr__(self, name: str) -> Any:  # behave like the wrapped file
        return getattr(self.fileobj, name)


class CachedFileReader(io.BufferedReader):
    """What a cached raw get returns: a read-only binary file, plus its metadata.

    ``filename``, ``content_type``, ``content_length``, ``last_modified`` (a
    POSIX timestamp) and ``etag`` (changes with every write of the key) come
    from the entry's record, without reading the content.
    """

    filename: str | None
    content_type: str | None
    content_length: int
    last_modified: float
    etag: str

    def __del__(self) -> None:
        # dogpile drops the file of an expired value it read (the caller never sees
        # it, so cannot close it): close it quietly instead of raising ResourceWarning.
        with contextlib.suppress(Exception):
            self.raw.close()


_BUFFERED_FILE_TYPES = (io.BufferedReader, io.BufferedRandom, CachedFileReader)


def open_cached(
    data_path: str, meta: RawMeta, created: float, *, quiet: bool = False
) -> CachedFileReader:
    """Open a data file read-only at the creator's position; FileNotFoundError if gone.

    ``quiet`` (a read-only cache): reading it does not update its atime, where
    the kernel allows that.
    """
    try:
        fd = (
            open_quietly(data_path, os.O_RDONLY | _OPEN_FLAGS)
            if quiet
            else os.open(data_path, os.O_RDONLY | _OPEN_FLAGS)
        )
    except OSError as exc:  # a symlink (ELOOP) or a socket (ENXIO) planted in its place
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        raise FileNotFoundError(errno.ENOENT, "data file is not a file", data_path) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != meta.size:
            raise FileNotFoundError(errno.ENOENT, "data file does not match its record", data_path)
        raw = io.FileIO(fd, "rb")  # from a descriptor: O_CLOEXEC is already set
    except BaseException:
        os.close(fd)
        raise
    raw.name = data_path
    try:
        return reader_over(raw, meta, created)
    except BaseException:
        raw.close()
        raise


def reader_over(raw: io.FileIO, meta: RawMeta, created: float) -> CachedFileReader:
    """A CachedFileReader of ``raw`` (an entry's bytes), at the creator's position."""
    reader = CachedFileReader(raw)
    reader.filename = meta.filename
    reader.content_type = meta.content_type
    reader.content_length = meta.size
    reader.last_modified = created
    reader.etag = f'"{meta.token}"'
    if meta.position:  # a new descriptor starts at 0
        reader.seek(meta.position)
    return reader


def unwrap(value: Any) -> tuple[Any, str | None, str | None]:
    """(file object, filename, content type) of a raw value; TypeError if not file-like."""
    filename = content_type = None
    if isinstance(value, CachedFile):
        value, filename, content_type = value.fileobj, value.filename, value.content_type
    if isinstance(value, (io.TextIOBase, str, bytes, bytearray, memoryview)) or not callable(
        getattr(value, "read", None)
    ):
        raise TypeError(f"the raw backend stores {ACCEPTED}; got {type(value).__name__}")
    if getattr(value, "closed", False):
        raise ValueError("the raw backend cannot store a closed file")
    readable = getattr(value, "readable", None)
    if callable(readable) and not readable():
        raise TypeError(f"the raw backend stores {ACCEPTED}; got a file not open for reading")
    if content_type is None:
        content_type = guess_type(value, filename)
    return value, filename, content_type


def guess_type(fileobj: Any, filename: str | None) -> str | None:
    """The content type ``mimetypes`` guesses from ``filename``, else from the file's name."""
    name = filename or getattr(fileobj, "name", None)
    return mimetypes.guess_type(name)[0] if isinstance(name, str) else None


DEFAULT_CONTENT_TYPE = "application/octet-stream"


def header_content_type(content_type: str | None) -> str:
    """The stored type if it is safe to put in a header, else ``application/octet-stream``."""
    if content_type and content_type.isascii() and content_type.isprintable():
        return content_type
    return DEFAULT_CONTENT_TYPE


def content_disposition(filename: str) -> str:
    """``inline`` with the name (RFC 6266): browsers show the file, and save it under it.

    Plain ASCII either way (a UTF-8 name goes in ``filename*``), as HTTP headers
    and S3 object headers need.
    """
    printable = "".join(c for c in filename if c.isprintable())
    fallback = printable.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    header = f'inline; filename="{fallback}"'
    if fallback != printable:
        header += f"; filename*=UTF-8''{quote(printable, safe='')}"
    return header


class Source(NamedTuple):
    """What a raw set learns about the caller's value, once (see ``inspect``)."""

    value: Any
    position: int | None  # where the caller left it; None for a stream
    fd: int | None  # a descriptor whose bytes are the value's, on a regular file
    info: os.stat_result | None  # that file's fstat

    @property
    def size(self) -> int | None:
        """The size of a value backed by a regular file, without reading it; None otherwise."""
        return None if self.info is None else self.info.st_size

    @property
    def can_reread(self) -> bool:
        """True if the value can be staged again after a failed attempt (it can seek)."""
        return self.position is not None


def inspect(value: Any) -> Source:
    """Look at a raw value once: its position, and the regular file behind it if any.

    A writable file is flushed first, so that its size counts what was written.
    """
    position = _tell(value)
    with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
        if value.writable():
            value.flush()
    fd = _fileno(value) if _reads_its_descriptor(value) else None
    if fd is not None and stat.S_ISREG((info := os.fstat(fd)).st_mode):
        return Source(value, position, fd, info)
    return Source(value, position, None, None)


def stage(source: Source, temp_fd: int, *, limit: int) -> tuple[int, int]:
    """Copy the bytes of ``source`` into the (empty, open) temp file: (size, position).

    Raises :class:`TooLarge` as soon as more than ``limit`` bytes are seen.
    """
    value, position = source.value, source.position
    if source.info is not None and source.fd is not None:
        size = source.info.st_size
        if size > limit:
            raise TooLarge(size)
        if size:  # a file whose size reads 0 may still have content (/proc): read() it
            size = _kernel_copy(source.fd, temp_fd, size)
            return size, min(position or 0, size)
    if position is None:  # a stream: store what is left, read back from the start
        return _copy_stream(value, temp_fd, limit), 0
    value.seek(0)
    try:
        size = _copy_stream(value, temp_fd, limit)
    finally:
        value.seek(position)
    return size, min(position, size)


def _reads_its_descriptor(value: Any) -> bool:
    """True if ``value.read()`` returns exactly the bytes of ``value.fileno()``.

    Only plain binary files and their buffered wrappers qualify (and our own
    hits); a compressed file object or any other wrapper decodes or filters.
    """
    if isinstance(value, tempfile._TemporaryFileWrapper):
        value = value.file
    if type(value) is io.FileIO:
        return True
    # A buffered wrapper counts only over a plain FileIO (not over, say, a GzipFile,
    # whose fileno() is the compressed file's).
    return type(value) in _BUFFERED_FILE_TYPES and type(getattr(value, "raw", None)) is io.FileIO


def _copy_stream(value: Any, fd: int, limit: int) -> int:
    """Copy ``value.read()`` to ``fd`` until EOF; the number of bytes.

    Raises TooLarge past ``limit`` and BlockingIOError if a non-blocking
    stream has nothing ready (a partial value must never look whole).
    """
    size = 0
    while True:
        chunk = value.read(_COPY_CHUNK)
        if chunk is None:
            raise BlockingIOError(
                errno.EAGAIN,
                "the stream is non-blocking and has no data ready; the raw backend "
                "stores a value only when it can read it to its end",
            )
        if isinstance(chunk, str):  # a text file inside a wrapper (NamedTemporaryFile("w+"))
            raise TypeError(
                f"the raw backend stores {ACCEPTED}; got {type(value).__name__}, whose "
                f"read() returns {type(chunk).__name__}: open it in binary mode"
            )
        if not chunk:
            return size
        size += len(chunk)
        if size > limit:
            raise TooLarge(size)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


class Move(NamedTuple):
    """A caller's file that goes into the cache as it is: renamed, or hard-linked
    (``link``) when its own close removes its name (a ``NamedTemporaryFile``)."""

    name: str
    link: bool
    fd: int  # the caller's open descriptor of it
    info: os.stat_result  # its fstat, as the caller left it
    mode: int | None  # the mode it gets in the cache (None: it has it already)

    def to(self, path: str) -> None:
        """Put the file at ``path`` (a fresh name: the link cannot meet an existing file)
        with the cache's mode, stamped now (a data file's mtime says when this cache
        stored it: a raw_tiered local copy's age).

        OSError if it cannot, then with nothing changed: if ``name`` no longer
        refers to the open file (checked right before the rename, so that
        another file given the name meanwhile is never taken for it), or if the
        file may not be changed (given back, see :meth:`back`).  The file is
        changed only once it is ours: a file left to the caller, or taken by
        another thread meanwhile, is never touched.
        """
        named = os.lstat(self.name)
        if (named.st_ino, named.st_dev) != (self.info.st_ino, self.info.st_dev):
            raise FileNotFoundError(errno.ENOENT, "no longer the file to move", self.name)
        if self.link:
            os.link(self.name, path)
        else:
            os.replace(self.name, path)
        try:  # by descriptor
            if self.mode is not None:
                os.fchmod(self.fd, self.mode)
            os.utime(self.fd)
        except OSError:
            self.back(path)
            raise

    def back(self, path: str) -> None:
        """Undo :meth:`to`: the file at ``path`` gets its name, mode and times back.

        Never over another file given that name meanwhile (EEXIST: it stays
        at ``path``, for a scan to reclaim).
        """
        if self.link:  # the name was left where it was
            os.unlink(path)
        else:
            os.link(path, self.name)
            os.unlink(path)
        info = self.info
        with contextlib.suppress(OSError):  # best effort: the caller's file, as it was
            if self.mode is not None:
                os.fchmod(self.fd, stat.S_IMODE(info.st_mode))
            os.utime(self.fd, ns=(info.st_atime_ns, info.st_mtime_ns))


def movable(source: Source, base_dir: str, data_dev: int, file_mode: int) -> Move | None:
    """How the caller's file can be moved into the cache, or None if it must be copied.

    Only a named regular file on the cache's filesystem (device ``data_dev``),
    with no other name (its name is checked again by :meth:`Move.to`), and never
    one of the cache's own files (a cache hit stored again, or any file named
    like an entry's data or a temp file): moving it would steal another entry's
    data from under its shard lock.  Judged by the name, with no path walk: a
    user's file that happens to be named so is copied instead.  The cache's
    bookkeeping files (``lock``, ``accounting``, the marker) raise ValueError
    (see :func:`_refuse_own_file`, one ``lstat`` for a file named like one).
    Nothing is changed here, and no other system call is made.
    """
    value, info, fd = source.value, source.info, source.fd
    name = getattr(value, "name", None)
    if not isinstance(name, str) or isinstance(value, CachedFileReader):
        return None
    if info is None or fd is None:
        return None
    base = os.path.basename(name)
    if layout.split_entry_name(base) is not None or layout.is_temp_name(base):
        return None
    if layout.is_bookkeeping_name(base):
        _refuse_own_file(name, info, os.path.join(base_dir, base))
        return None  # a user's file named like one: copied all the same
    if info.st_dev != data_dev:
        return None  # another filesystem: a rename cannot take it
    if info.st_nlink != 1:
        # Another name for it (the user's, or a link to another entry's data file): the
        # bytes could change through it, or two entries would share one file.
        return None
    deletes_itself = isinstance(value, tempfile._TemporaryFileWrapper) and (
        getattr(value, "delete", False)
        or getattr(getattr(value, "_closer", None), "delete", False)
    )
    mode = None if stat.S_IMODE(info.st_mode) == file_mode else file_mode
    return Move(name, bool(deletes_itself), fd, info, mode)


def _refuse_own_file(name: str, info: os.stat_result, own_path: str) -> None:
    """ValueError if the caller's file ``name`` is the cache's own file at ``own_path``.

    A move would take it out of its place: the lock file (every lock with it),
    the accounting file (whose writes would then change an entry's bytes), the
    marker.  Judged by identity, so any path to it (a symlinked directory) is caught.
    """
    try:
        own = os.lstat(own_path)
    except OSError:
        return
    if (own.st_ino, own.st_dev) == (info.st_ino, info.st_dev):
        raise ValueError(
            f"the raw backend cannot take value {name!r} with file_movable=True: it is this "
            f"cache's own {own_path}; pass a file of your own (a copy of it)"
        )


def _kernel_copy(source_fd: int, target_fd: int, size: int) -> int:
    """Copy ``size`` bytes from offset 0 without moving the source's position."""
    offset = 0
    use_copy_range = hasattr(os, "copy_file_range")  # Linux only
    while offset < size:
        try:
            if use_copy_range:
                sent = os.copy_file_range(source_fd, target_fd, size - offset, offset)
            else:
                sent = os.sendfile(target_fd, source_fd, offset, size - offset)
        except OSError as exc:
            if not use_copy_range or exc.errno not in _KERNEL_COPY_FALLBACK:
                raise
            use_copy_range = False
            continue
        if sent == 0:
            break  # the file shrank while we copied
        offset += sent
    return offset


def _tell(value: Any) -> int | None:
    seekable = getattr(value, "seekable", None)
    if callable(seekable) and not seekable():
        return None
    try:
        position: int = value.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return position


def _fileno(value: Any) -> int | None:
    try:
        fd: int = value.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd


# O_NONBLOCK: a FIFO planted in place of a data file must not hang the reader.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
