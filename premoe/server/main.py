"""Run the server: bind the socket first (a clear error if the port is taken), then uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, waits up to ``drain_seconds``
for in-flight requests (streams included) to finish, then the app's shutdown finishes whatever
is still queued and ends the worker, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Callable

from premoe.errors import InputError
from premoe.server.app import create_app
from premoe.server.options import ServeOptions

log = logging.getLogger("premoe")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve `host` {host!r} ({e.strerror}); use an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another `port` or `host`") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(
    backend, opts: ServeOptions, sock: socket.socket, drain_seconds: float = 120.0, log_level: str = "warning"
):
    """A uvicorn ``Server`` for ``backend`` on ``sock`` (run it with ``server.run(sockets=[sock])``)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # the signal asked for a graceful drain and got one: exit 0, do not re-raise it
                    getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(
        create_app(backend, opts),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=drain_seconds,
        lifespan="on",
    )
    return Server(config)


def serve(backend, opts: ServeOptions, announce: Callable[[str], None] = print) -> int:
    """Serve ``backend`` on ``opts.host:opts.port`` until SIGTERM/SIGINT; returns the exit status."""
    sock = bind(opts.host, opts.port)
    server = make_server(backend, opts, sock, opts.drain_seconds, opts.log_level)
    if opts.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "listening on %s: reachable from other machines%s",
            opts.host,
            "" if opts.api_key else " and no API key is set",
        )
    announce(
        f"premoe serve: listening on {url_of(sock)} (tasks: {', '.join(backend.tasks)}; model 'auto' routes "
        f"each request)"
    )
    server.run(sockets=[sock])
    return 0
