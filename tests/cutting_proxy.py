"""A TCP proxy on 127.0.0.1 that cuts connections mid-response, to test resumed reads.

``CuttingProxy(host, port, cut_after=N, cuts=K)`` forwards bytes both ways. Once the responses
relayed since the last cut (over all connections) pass ``N`` bytes, the connection carrying
them is closed mid-response, as a flaky network or a restarted load balancer would; that
happens ``K`` times, then the proxy relays faithfully. ``ranges`` lists the ``Range`` headers the client sent, so a test
can see where a resumed read started.
"""

from __future__ import annotations

import re
import socket
import threading

_RANGE = re.compile(rb"\r\nrange: *bytes=(\d+)-", re.IGNORECASE)


class CuttingProxy:
    def __init__(self, host: str, port: int, cut_after: int, cuts: float):
        self.target = (host, port)
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cuts_made = 0
        self.relayed = 0  # response bytes since the last cut
        self.ranges: list[int] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.running = False
        self.listener.close()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        while data := _recv(client):
            with self.lock:
                self.ranges.extend(int(m) for m in _RANGE.findall(data))
            if not _send(server, data):
                break
        _close(client, server)

    def _responses(self, server: socket.socket, client: socket.socket) -> None:
        while data := _recv(server):
            keep = self._allowance(len(data))
            if keep < len(data):
                _send(client, data[:keep])
                break
            if not _send(client, data):
                break
        _close(client, server)

    def _allowance(self, size: int) -> int:
        """How many of the next ``size`` bytes go through before a cut (``size``: no cut)."""
        with self.lock:
            if self.cuts_left <= 0 or self.relayed + size <= self.cut_after:
                self.relayed += size
                return size
            keep = self.cut_after - self.relayed
            self.cuts_left -= 1
            self.cuts_made += 1
            self.relayed = 0
            return keep


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
