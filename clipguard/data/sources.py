"""Open a shard as a byte stream that never ends silently short.

Two ways a stream can lie, and what this module does about each:

- An HTTP body can stop early: urllib returns a short read as end-of-file when the connection
  drops before Content-Length is reached, and raises `http.client.IncompleteRead` for a chunked
  body cut short. `HttpShardStream` notices both, reconnects with a Range request from the byte
  it got to (or, where the server ignores Range, reads again from the start and skips what it
  already has), and gives up after `HttpRetry.attempts` tries with exponential back-off, raising
  `SourceReadError`. Transient answers (5xx, 429, timeouts, refused connections) are retried
  the same way when opening. A missing object (404) or a refusal (401/403) is not retried.
- A tar member can claim more bytes than the stream holds (a 3.5 KB tar whose header says
  2 TB): tarfile skips a member by reading it 10 KiB at a time, so the cost grows with the
  claimed size. `EndStrictReader` raises `EOFError` once reads keep coming after the end, which
  tarfile passes up at once, so skipping costs O(bytes actually there).

Object stores (`s3://`, `gs://`, `hf://`, ... through fsspec, see `remotefs.py`) get
`FsspecShardStream`: the object's size is known when it is opened, so a read that ends before
it, or fails on a transient error, reopens the object at the byte reached (a ranged GET) with
the same `HttpRetry` policy, and gives up with `SourceReadError`. A missing object or an auth
failure is not retried and says what to check.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import BinaryIO

HTTP_TIMEOUT_S = 30
# Object stores are read in ranged GETs of this size (s3fs's default is 50 MB): a cut costs at
# most one block, and a resumed read starts at the block that failed.
FSSPEC_BLOCK_BYTES = 8 << 20
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class SourceReadError(OSError):
    """A shard's bytes could not be read in full after retries (the source failed, not the data)."""


@dataclass(frozen=True)
class HttpRetry:
    """How hard to try: ``attempts`` tries in all, waiting base * 2**n seconds between them."""

    # Read when a run starts, so an environment (a test, a CI job) can tune them.
    attempts: int = field(default_factory=lambda: int(os.environ.get("CLIPGUARD_HTTP_ATTEMPTS", "4")))
    backoff_seconds: float = field(default_factory=lambda: float(os.environ.get("CLIPGUARD_HTTP_BACKOFF", "0.5")))
    timeout_seconds: float = HTTP_TIMEOUT_S

    def wait(self, failures: int) -> None:
        time.sleep(self.backoff_seconds * (2 ** (failures - 1)))


def open_source(url: str, is_remote: bool, retry: HttpRetry | None = None) -> BinaryIO:
    """The shard's bytes as a buffered stream that raises at a short end instead of stopping."""
    if is_remote and url.startswith(("http://", "https://")):
        raw: io.RawIOBase = HttpShardStream(url, retry or HttpRetry())
    elif is_remote:
        raw = FsspecShardStream(url, retry or HttpRetry())
    elif url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)  # noqa: S602
        raw = _RawFile(process.stdout)
    else:
        raw = _RawFile(open(url, "rb"))
    return io.BufferedReader(EndStrictReader(raw), buffer_size=1 << 16)


class _RawFile(io.RawIOBase):
    def __init__(self, handle: BinaryIO):
        self.handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.handle.readinto(buffer)

    def close(self) -> None:
        self.handle.close()
        super().close()


class EndStrictReader(io.RawIOBase):
    """Passes reads through; once the stream has reported its end a few times, a further read
    raises EOFError. tarfile itself asks past the end at most a couple of times on a well-formed
    archive; a reader that keeps asking is skipping data that is not there."""

    EMPTY_READS_ALLOWED = 4

    def __init__(self, inner: io.RawIOBase):
        self.inner = inner
        self.empty_reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.empty_reads >= self.EMPTY_READS_ALLOWED and len(buffer):
            raise EOFError("the stream ended before the bytes a tar header announced")
        n = self.inner.readinto(buffer)
        if not n and len(buffer):
            self.empty_reads += 1
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


class HttpShardStream(io.RawIOBase):
    """An HTTP(S) body read to its full length, reconnecting where the connection breaks."""

    def __init__(self, url: str, retry: HttpRetry):
        self.url = url
        self.retry = retry
        self.position = 0
        self.length: int | None = None  # the whole body's length, where the server says it
        self.failures = 0
        self.response = self._connect()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self.response.readinto(buffer)
            except (http.client.HTTPException, OSError) as exc:
                self._reconnect(f"{type(exc).__name__}: {exc}")
                continue
            if n == 0 and len(buffer) and self.length is not None and self.position < self.length:
                self._reconnect(f"connection closed at byte {self.position} of {self.length}")
                continue
            self.position += n
            return n

    def close(self) -> None:
        response = getattr(self, "response", None)
        if response is not None:
            response.close()
        super().close()

    def _reconnect(self, why: str) -> None:
        self.response.close()
        self.failures += 1
        if self.failures >= self.retry.attempts:
            raise SourceReadError(f"{self.url}: {why}; gave up after {self.failures} tries")
        self.retry.wait(self.failures)
        self.response = self._connect()

    def _connect(self):
        while True:
            try:
                return self._open_at(self.position)
            except _Transient as exc:
                self.failures += 1
                if self.failures >= self.retry.attempts:
                    raise SourceReadError(f"{self.url}: {exc}; gave up after {self.failures} tries") from None
                self.retry.wait(self.failures)

    def _open_at(self, offset: int):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = urllib.request.Request(self.url, headers=headers)  # noqa: S310 (http/https only)
        try:
            response = urllib.request.urlopen(request, timeout=self.retry.timeout_seconds)  # noqa: S310
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP Error {exc.code}: {exc.reason}") from None
            raise  # 404, 401, 403...: asking again will not help
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as exc:
            raise _Transient(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
        if offset == 0:
            declared = response.headers.get("Content-Length")
            self.length = int(declared) if declared and declared.isdigit() else None
            return response
        if response.status == 206:
            return response
        # The server ignored Range and sent the whole body again: skip what we already have.
        try:
            _discard(response, offset)
        except (http.client.HTTPException, OSError) as exc:
            response.close()
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        return response


class FsspecShardStream(io.RawIOBase):
    """An fsspec object read to its full size, reopened at the byte reached where a read fails."""

    def __init__(self, url: str, retry: HttpRetry):
        from clipguard.data import remotefs  # fsspec only for runs that use it

        self.handle = None  # close() must work even when opening fails
        self.url = url
        self.retry = retry
        self.remotefs = remotefs
        self.fs, self.path = remotefs.filesystem(url)
        self.position = 0
        self.failures = 0
        self.handle = remotefs.with_retries(self._open, url, retry)
        self.size: int | None = getattr(self.handle, "size", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self.handle.readinto(buffer)
            except (TypeError, AttributeError):
                raise
            except Exception as exc:  # noqa: BLE001 - backends raise their own classes; sorted here
                final = self.remotefs.translate(exc, self.url)
                if final is not None:
                    raise final from None
                self._reopen(self.remotefs.describe(exc))
                continue
            if n == 0 and len(buffer) and self.size is not None and self.position < self.size:
                self._reopen(f"the object ended at byte {self.position} of {self.size}")
                continue
            self.position += n
            return n

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.handle.close()
            except Exception:  # noqa: BLE001 - closing a read handle cannot lose data
                pass
        super().close()

    def _open(self):
        handle = self.fs.open(self.path, "rb", block_size=FSSPEC_BLOCK_BYTES, cache_type="readahead")
        if self.position:
            handle.seek(self.position)
        return handle

    def _reopen(self, why: str) -> None:
        self.failures += 1
        if self.failures >= self.retry.attempts:
            raise SourceReadError(f"{self.url}: {why}; gave up after {self.failures} tries")
        self.retry.wait(self.failures)
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001 - the old handle is broken already
            pass
        self.handle = self.remotefs.with_retries(self._open, self.url, self.retry)


class _Transient(Exception):
    pass


def _discard(response, count: int) -> None:
    remaining = count
    while remaining:
        chunk = response.read(min(remaining, 1 << 16))
        if not chunk:
            raise _Transient(f"the body ended at byte {count - remaining} while skipping to {count}")
        remaining -= len(chunk)
