"""An output folder that is a local path or an object-store URL (``s3://``, ``gs://``, ``file://`` ...).

Writers never write into the folder directly. They write a file under ``staging`` and call
``publish(name)``, which makes it appear in the folder whole or not at all:

- local: ``staging`` is the folder itself. The caller writes ``staging / (name + ".tmp")`` and
  renames it to ``staging / name`` with ``os.replace`` (atomic on one file system);
  ``publish`` then only checks that the file is there.
- remote: ``staging`` is a private temporary directory. ``publish`` uploads the file (an S3 PUT,
  or a multipart upload's completion, makes the object visible whole) and deletes the staged
  copy, so disk use stays at one file in flight; read it back with ``fetch`` or ``read_bytes``.

Small files (JSON) go through ``write_bytes``, atomic either way. Names are plain file names
directly in the folder; names that start with a dot are private (temporary files) and ``list``
leaves them out. A name that is not there raises ``FileNotFoundError``; a refusal, a missing
backend or a store that keeps failing after retries (``HttpRetry``'s attempts and back-off)
raises ``StorageError`` with a message that says what to check. Credentials and endpoints are
the backend's own (see ``remotefs``): for S3, the AWS variables and ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from pathlib import Path

from clipguard.data import remotefs
from clipguard.data.sources import SourceReadError
from clipguard.errors import StorageError


class OutputFolder(ABC):
    """A folder of output files; ``OutputFolder.at(location)`` gives the local or remote kind."""

    location: str  # as the user gave it, normalised: an absolute path, or a URL without a trailing /
    is_local: bool

    @classmethod
    def at(cls, location: str | Path) -> "OutputFolder":
        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if text.startswith(("http://", "https://")):
            raise StorageError(f"{text}: an HTTP URL cannot be written to; give a local folder or an s3:// URL")
        if remotefs.is_fsspec_url(text):
            return RemoteFolder(text)
        return LocalFolder(Path(text))

    @property
    @abstractmethod
    def staging(self) -> Path:
        """A local directory where files are written before ``publish`` (created on first use)."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` is a file in the folder now (asked afresh, never from a cache)."""

    @abstractmethod
    def list(self, suffix: str = "") -> list[str]:
        """Names of the files directly in the folder that end with ``suffix``, sorted."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The whole content of ``name``."""

    @abstractmethod
    def fetch(self, name: str) -> Path:
        """A local readable copy of ``name`` (the file itself when the folder is local)."""

    @abstractmethod
    def publish(self, name: str) -> None:
        """Make ``staging / name`` visible as ``name`` in the folder, whole."""

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file atomically: readers see the old content or the new, never a part."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete ``name``; a name that is not there is not an error."""

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalFolder(OutputFolder):
    is_local = True

    def __init__(self, path: Path):
        self.path = path.expanduser().absolute()
        self.location = str(self.path)

    @property
    def staging(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def exists(self, name: str) -> bool:
        return (self.path / _plain(name)).is_file()

    def list(self, suffix: str = "") -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))

    def read_bytes(self, name: str) -> bytes:
        return (self.path / _plain(name)).read_bytes()

    def fetch(self, name: str) -> Path:
        path = self.path / _plain(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path

    def publish(self, name: str) -> None:
        # The caller's os.replace into the folder was the atomic step; make sure it happened.
        self.fetch(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.staging / _plain(name)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def remove(self, name: str) -> None:
        (self.path / _plain(name)).unlink(missing_ok=True)


class RemoteFolder(OutputFolder):
    is_local = False

    def __init__(self, url: str):
        self.location = url.rstrip("/")
        try:
            self.fs, root = remotefs.filesystem(self.location)
        except remotefs.NoBackend as exc:
            raise StorageError(str(exc)) from None
        self.root = root.rstrip("/")
        self._private: Path | None = None

    @property
    def staging(self) -> Path:
        return self._scratch() / "staging"

    def exists(self, name: str) -> bool:
        path = self._path(name)
        self.fs.invalidate_cache(path)  # another worker may have written it since we last looked
        try:
            info = self._call(lambda: self.fs.info(path), name)
        except FileNotFoundError:
            return False
        return info.get("type", "file") != "directory"

    def list(self, suffix: str = "") -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._call(lambda: self.fs.ls(self.root, detail=True), "")
        except FileNotFoundError:
            return []  # an object store has no empty folders: nothing written here yet
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type", "file") != "directory")
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)
        return self._call(lambda: self.fs.cat_file(path), name)

    def fetch(self, name: str) -> Path:
        path = self._path(name)
        folder = self._scratch() / "fetched"
        target = folder / _plain(name)
        temporary = folder / f".{target.name}.tmp"
        self._call(lambda: self.fs.get_file(path, str(temporary)), name)
        os.replace(temporary, target)
        return target

    def publish(self, name: str) -> None:
        staged = self.staging / _plain(name)
        if not staged.is_file():
            raise FileNotFoundError(f"{staged} does not exist; write it before publishing {name}")
        self._call(lambda: self.fs.put_file(str(staged), self._path(name)), name)
        staged.unlink()

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self._call(lambda: self.fs.pipe_file(path, data), name)

    def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            self._call(lambda: self.fs.rm_file(path), name)
        except FileNotFoundError:
            pass

    def _path(self, name: str) -> str:
        return f"{self.root}/{_plain(name)}"

    def _call(self, action, name: str):
        url = f"{self.location}/{name}" if name else self.location
        try:
            return remotefs.with_retries(action, url)
        except remotefs.Missing:
            raise
        except (remotefs.Denied, remotefs.NoBackend, SourceReadError) as exc:
            raise StorageError(str(exc)) from None

    def _scratch(self) -> Path:
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="clipguard-out-"))
            weakref.finalize(self, shutil.rmtree, self._private, ignore_errors=True)
        for part in ("staging", "fetched"):
            (self._private / part).mkdir(exist_ok=True)
        return self._private


def _plain(name: str) -> str:
    """A file name directly in the folder: no separators, no '..' (a caller's bug, said plainly)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a plain file name")
    return name
