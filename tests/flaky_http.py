"""A real HTTP server on 127.0.0.1 that misbehaves on purpose, one planned fault per request.

``FlakyServer(folder)`` serves the files of ``folder``. ``plan(name, [...])`` lists what the next
requests for ``name`` get, one entry each, then plain service:

- ``"ok"``: the file (honouring ``Range: bytes=N-`` with 206, like a real object store);
- ``"500"`` / ``"404"`` / ``"503"``: that status;
- ``("drop", n)``: Content-Length of the whole body, but the connection closes after n bytes;
- ``("chunked_drop", n)``: a chunked body that stops after n bytes without its last chunk;
- ``"no_range"``: the whole file with 200 even when a Range was asked for.

``requests[name]`` counts requests per file, so a test can see what a rerun fetched.
"""

from __future__ import annotations

import http.server
import threading
from collections import defaultdict
from pathlib import Path


class FlakyServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.plans: dict[str, list] = defaultdict(list)
        self.requests: dict[str, int] = defaultdict(int)
        self.ranges: list[str] = []
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def plan(self, name: str, faults: list) -> None:
        with self.lock:
            self.plans[name] = list(faults)

    def __enter__(self) -> "FlakyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, name: str):
        with self.lock:
            self.requests[name] += 1
            return self.plans[name].pop(0) if self.plans[name] else "ok"

    def _handler(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                fault = owner._next_fault(name)
                path = owner.folder / name
                if fault in ("500", "503", "404") or not path.is_file():
                    status = 404 if not path.is_file() else int(fault)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                body = path.read_bytes()
                asked = self.headers.get("Range")
                if asked:
                    owner.ranges.append(asked)
                start = int(asked.split("=")[1].split("-")[0]) if asked and fault != "no_range" else 0
                if isinstance(fault, tuple) and fault[0] == "chunked_drop":
                    self._chunked(body[start:], fault[1])
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Connection", "close")
                self.end_headers()
                payload = body[start:]
                if isinstance(fault, tuple) and fault[0] == "drop":
                    payload = payload[: fault[1]]
                self.wfile.write(payload)
                self.wfile.flush()
                self.close_connection = True

            def _chunked(self, body: bytes, stop: int) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                sent = body[:stop]
                for i in range(0, len(sent), 4096):
                    piece = sent[i : i + 4096]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()  # no terminating 0-length chunk: the body ends early
                self.close_connection = True

        return Handler
