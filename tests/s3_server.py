"""A real S3-compatible server on 127.0.0.1 for tests: moto's standalone server, in a thread.

Use the ``s3_server`` fixture (import it into your test module: ``from s3_server import
s3_server``). It points every S3 client in this process at the server the way a user points
clipguard at MinIO: ``AWS_ENDPOINT_URL`` (read by botocore, hence s3fs), with dummy
credentials and region, and no reading of ~/.aws or the EC2 metadata service. ``upload`` puts a
local file at an ``s3://`` URL; ``require_auth()`` makes the server check credentials (which
then fail, as no IAM user exists), to see what a user with wrong keys sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest


class S3Server:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def environment(self) -> dict[str, str]:
        missing = os.devnull
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": missing,
            "AWS_SHARED_CREDENTIALS_FILE": missing,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem()

    def bucket(self, name: str) -> str:
        if not self.fs.exists(name):
            self.fs.mkdir(name)
        return f"s3://{name}"

    def upload(self, local: Path, url: str) -> None:
        self.fs.put_file(str(local), url)

    @contextlib.contextmanager
    def require_auth(self):
        from moto import settings

        before = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = before

    def stop(self) -> None:
        self.server.stop()


def _clear_s3_clients() -> None:
    # fsspec caches one S3FileSystem per set of arguments; one made before the environment
    # changed would still talk to the old endpoint with the old keys.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (pip install -e '.[test,s3]')")
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install -e '.[s3]')")
    server = S3Server()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        _clear_s3_clients()
        try:
            yield server
        finally:
            _clear_s3_clients()
            server.stop()
