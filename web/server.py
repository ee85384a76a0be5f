"""Running the playground: bind the socket, build the app for it, serve with uvicorn.

``lorareg serve`` calls :func:`serve`; tests and benchmarks use :class:`BackgroundServer`, which
serves the same app from a thread on a free loopback port.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loralib.errors import InvalidArgumentError

from .actions import Settings
from .security import WILDCARD_HOSTS, Guard


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                   "Choose another --port (0 picks a free one) or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int, token: str | None = None) -> str:
    """The address to open: loopback for a wildcard bind, with the token when one is needed."""
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


@dataclass
class Served:
    """A bound server: its app, guard, socket and address."""

    app: object
    guard: Guard
    sock: socket.socket
    url: str


def prepare(settings: Settings, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
            allow_hosts: tuple[str, ...] = ()) -> Served:
    """Bind and build the app. A host that is not loopback always gets an access token (one is made if not given)."""
    from .app import create_app

    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    sock = bind(host, port)
    actual_port = sock.getsockname()[1]
    guard = Guard(port=actual_port, bind_host=host, token=token,
                  allowed_hosts=frozenset(h.strip().lower().strip("[]") for h in allow_hosts if h.strip()))
    return Served(create_app(settings, guard), guard, sock, url_for(host, actual_port, token))


def _uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    return uvicorn.Server(config)


def serve(served: Served) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = _uvicorn_server(served.app)
    try:
        server.run(sockets=[served.sock])
    finally:
        served.app.state.pg.jobs.shutdown()
        served.sock.close()


class BackgroundServer:
    """Serve an app from a thread (tests, benchmarks)::

        with BackgroundServer(Settings(home, out)) as server:
            urllib.request.urlopen(server.url)
    """

    def __init__(self, settings: Settings, host: str = "127.0.0.1", *, token: str | None = None) -> None:
        self.served = prepare(settings, host, 0, token=token)
        self.url = self.served.url.split("?")[0].rstrip("/")
        self.app = self.served.app
        self._server = _uvicorn_server(self.app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.served.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self.app.state.pg.jobs.shutdown()
        self.served.sock.close()

    @property
    def jobs(self):
        return self.app.state.pg.jobs


def default_output_dir(home: str | None) -> Path:
    """Where the playground writes outputs unless told: ``outputs/`` in the catalog folder."""
    from lorareg.registry.home import catalog_home

    return catalog_home(home) / "outputs"
