"""The one place that talks to fsspec: which URLs it serves, how its errors read, how hard to retry.

``s3://``, ``gs://``, ``hf://`` (and any other scheme fsspec knows, such as ``memory://``) go
through fsspec; ``http(s)://`` keeps its own reader in ``sources.py`` and ``file://`` is a
local path. fsspec is imported only when such a URL is used, so local runs never pay for it.

Credentials and endpoints come from where each backend already looks: for S3 that is botocore's
chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles) and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server such as MinIO or
moto; fsspec's own ``FSSPEC_S3_ENDPOINT_URL`` works too.

Errors fall in four kinds. A missing object and a refusal are answered at once (asking again
will not help) with a message that says what to check; a missing backend names the package to
install; everything else (timeouts, dropped connections, 5xx, throttling) is transient and is
retried with the same policy and back-off as HTTP shards (``HttpRetry``), on top of whatever
retries the backend does itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from clipguard.data.sources import HttpRetry, SourceReadError

T = TypeVar("T")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Served elsewhere: http(s) by HttpShardStream, file:// as a local path.
_NOT_FSSPEC = frozenset({"http", "https", "file"})
# What to install for the schemes people use; fsspec's own hint covers the rest.
_BACKEND_PACKAGES = {"s3": "s3fs (pip install 'clipguard[s3]')", "s3a": "s3fs (pip install 'clipguard[s3]')",
                     "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "az": "adlfs", "abfs": "adlfs"}
_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                                "NoAuthTokenError", "InvalidConfigError", "RefreshError", "DefaultCredentialsError"})


class Missing(FileNotFoundError):
    """The object or prefix is not there (a clear message; not retried)."""


class Denied(PermissionError):
    """The store refused us: no credentials, wrong credentials or no right to read (not retried)."""


class NoBackend(OSError):
    """The scheme cannot be used here: its package is not installed, or its backend is set offline."""


def scheme_of(url: str) -> str | None:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def is_fsspec_url(url: str) -> bool:
    """``s3://``, ``gs://``, ``hf://`` ...: any ``scheme://`` that is not http(s) or file."""
    scheme = scheme_of(url)
    return scheme is not None and scheme not in _NOT_FSSPEC


def filesystem(url: str):
    """The fsspec filesystem for ``url`` and the path inside it (no protocol)."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub, which open_clip needs
        raise NoBackend(f"{url}: remote storage needs fsspec (pip install fsspec)") from None
    scheme = scheme_of(url) or ""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = _BACKEND_PACKAGES.get(scheme)
        hint = f"install {package}" if package else str(exc)
        raise NoBackend(f"{url}: {scheme}:// needs a package that is not installed: {hint}") from None
    except ValueError as exc:  # "Protocol not known: ..."
        raise NoBackend(f"{url}: {exc}") from None


def with_retries(action: Callable[[], T], url: str, retry: HttpRetry | None = None) -> T:
    """Run ``action``; retry transient failures with back-off, translate the rest.

    Raises Missing, Denied or NoBackend at once, SourceReadError after the last try."""
    retry = retry or HttpRetry()
    failures = 0
    while True:
        try:
            return action()
        except (TypeError, AttributeError, NameError):
            raise  # our bug or the backend's, not the network's: another try would hide it
        except Exception as exc:  # noqa: BLE001 - each backend has its own error classes; sorted below
            final = translate(exc, url)
            if final is not None:
                raise final from None
            failures += 1
            if failures >= retry.attempts:
                raise SourceReadError(f"{url}: {describe(exc)}; gave up after {failures} tries") from None
            retry.wait(failures)


def translate(exc: BaseException, url: str) -> OSError | None:
    """The error to raise at once for ``exc``, or None when it is worth another try."""
    if isinstance(exc, (Missing, Denied, NoBackend)):
        return exc
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return Missing(f"{url} does not exist ({describe(exc)}); check the bucket and object name")
    if isinstance(exc, PermissionError) or type(exc).__name__ in _CREDENTIAL_ERRORS:
        return Denied(
            f"{url}: access denied ({describe(exc)}). Check the credentials the backend finds "
            "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL "
            "for an S3-compatible server) and that they may read and write this location"
        )
    if isinstance(exc, ImportError):
        return NoBackend(f"{url}: {exc}")
    if type(exc).__name__ == "OfflineModeIsEnabled":  # HF_HUB_OFFLINE=1: trying again cannot help
        return NoBackend(f"{url}: {describe(exc)}")
    return None


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
