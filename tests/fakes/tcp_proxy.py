"""A TCP proxy in front of the live server (or any TCP server, e.g. PostgreSQL): it records each
connection's request head and can cut every open connection, as a load balancer restart or a
network drop would, or refuse new ones for a while, as a server that is down would."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[str] = []
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record and data[:8].split(b" ")[0] in (b"GET", b"POST", b"PATCH", b"DELETE"):
                    with self._lock:
                        self.requests.append(data.split(b"\r\n\r\n")[0].decode("latin-1"))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        """Cut every open connection in both directions, mid-body if need be."""
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def refuse(self) -> None:
        """The upstream looks down: new connections are refused and open ones cut, until
        `restore`."""
        self.listener.close()
        self.drop_all()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def requests_with(self, text: str) -> list[str]:
        with self._lock:
            return [r for r in self.requests if text.lower() in r.lower()]

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.drop_all()
