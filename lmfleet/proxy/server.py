"""Run the proxy app under uvicorn inside the fleet's own event loop.

`start_server(fleet, options)` binds the listening socket first (so "port in use"
is a clear error in the caller, not uvicorn's `sys.exit`), starts uvicorn's
`Server.serve(sockets=[sock])` as a task in the fleet's task group, and returns
once it is accepting connections. `ProxyServer.stop()` ends it; so does closing
the fleet (its task group is cancelled).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING

import anyio
import uvicorn
from anyio.abc import TaskStatus

from lmfleet.errors import ConfigError, EventLoopError, LMFleetError
from lmfleet.proxy import state_file
from lmfleet.proxy.app import create_app
from lmfleet.proxy.front_door import FrontDoor
from lmfleet.proxy.options import ProxyOptions
from lmfleet.proxy.shared import HubLink, Link, SharedState

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet.proxy")
SHUTDOWN_GRACE = 5


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot serve on {host}:{port}: the port is in use") from exc
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _check_tls(options: ProxyOptions) -> None:
    """Load the key and certificate now, so a bad file is a clear error, not uvicorn's exit."""
    if options.ssl_certfile is None or options.ssl_keyfile is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.ssl_certfile, options.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot serve HTTPS with certificate {options.ssl_certfile} and key "
            f"{options.ssl_keyfile}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc


class ProxyServer:
    """A running proxy: `url`, `stop()` (idempotent); a `with` block stops it too."""

    def __init__(self, fleet: FleetSurface, options: ProxyOptions) -> None:
        self._fleet = fleet
        self.options = options
        _check_tls(options)
        if options.listen_fd is not None:  # a worker's: the supervisor bound it
            self._sock = socket.socket(fileno=os.dup(options.listen_fd))
            self._sock.setblocking(False)
        else:
            self._sock = _bind(options.host, options.port)
        self.port: int = self._sock.getsockname()[1]
        shown = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"{options.scheme}://{shown}:{self.port}"
        self._app = create_app(fleet, options, port=self.port)
        self.shared: SharedState | None = None
        link: Link | None = None
        hub = None if options.hub is None else HubLink(options.hub, options.worker)
        if options.store is not None:  # a replica's (each worker of one, with `--workers`)
            from lmfleet.proxy.store import StoreLink

            # A worker's requests in flight go to its hub, which speaks for the replica.
            link = StoreLink(options.store, options.store_name, counts=hub is None)
        else:
            link, hub = hub, None
        if link is not None:
            self.shared = self._app.shared = SharedState(
                fleet, link, options.worker, hub, options.workers
            )
        config = uvicorn.Config(
            self._app,
            lifespan="on",
            interface="asgi3",
            http=FrontDoor,
            log_config=None,
            log_level=options.log_level.lower(),
            access_log=options.access_log,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            ssl_keyfile=options.ssl_keyfile,
            ssl_certfile=options.ssl_certfile,
        )
        self._server = uvicorn.Server(config)
        self._finished: anyio.Event | None = None
        self._stopped = False
        self._state_written: str | None = None
        """The state file's text as last written at start (None: no state file)."""

    @property
    def running(self) -> bool:
        return self._finished is not None and not self._finished.is_set()

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        self._finished = anyio.Event()
        server = self._server
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve, tg.cancel_scope)
                while not server.started:
                    if self._finished.is_set():
                        raise LMFleetError(f"the proxy on {self.url} failed to start; see the log")
                    await anyio.sleep(0.01)
                log.info("lmfleet proxy listening on %s", self.url)
                path = self.options.state_file
                if path is not None and self._state_written is not None:
                    tg.start_soon(state_file.keep, path, self._fleet, self._state_written)
                task_status.started()
        finally:
            self._sock.close()
            self._finished.set()

    async def _serve(self, done: anyio.CancelScope) -> None:
        assert self._finished is not None
        server = self._server
        try:
            await server.serve(sockets=[self._sock])
        except SystemExit:  # uvicorn's answer to a failed lifespan startup
            log.error("the proxy's startup failed")
        finally:
            if server.started and not self._finished.is_set():
                # Cancelled with the fleet: a bounded graceful shutdown, shielded.
                with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE):
                    if not server.should_exit:
                        self._app.stop()
                        server.should_exit = True
                        await server.shutdown(sockets=[self._sock])
            self._finished.set()
            done.cancel()  # the tasks beside the server (the state file's keeper)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (bounded), close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        runtime = self._fleet.runtime
        if runtime.closed or self._finished is None:
            return

        async def stop() -> None:
            self._app.stop()
            self._server.should_exit = True
            assert self._finished is not None
            with anyio.move_on_after(timeout):
                await self._finished.wait()

        runtime.run(stop)

    def __enter__(self) -> ProxyServer:
        """`with fleet.serve(port=8000) as server:`: stopped when the block ends, as
        the fleet's own `with` closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ProxyServer {self.url} {'running' if self.running else 'stopped'}>"


def start_server(fleet: FleetSurface, options: ProxyOptions) -> ProxyServer:
    """Start serving `fleet` in its own loop; return when the port accepts connections."""
    fleet.runtime.check_open()
    if fleet.runtime.in_loop_thread():
        raise EventLoopError("fleet.serve() blocks; call it outside the fleet's event loop")
    path = options.state_file
    # A file that is no node list stops us before anything binds.
    entries = state_file.read(path) if path is not None else []
    server = ProxyServer(fleet, options)
    try:
        if path is not None:
            loaded = state_file.load(path, entries, fleet)
            if loaded:
                log.info("state file %s: %d node(s) reloaded, each probed before use", path, loaded)
            else:
                log.info(
                    "state file %s: nothing to reload yet; the node list is kept there from now on",
                    path,
                )
            try:
                if options.worker == 0:  # one writer: every worker shares the same nodes
                    server._state_written = state_file.save(path, fleet)
            except OSError as exc:
                raise ConfigError(
                    f"cannot write the state file {path}: {exc.strerror or exc} "
                    "(give --state-dir or --state-file elsewhere, or --disable-cache-status)"
                ) from exc
        if server.shared is not None:  # the others' decisions first: then serve
            fleet.runtime.start(server.shared.run, name="lmfleet shared state")
        fleet.runtime.start(server._run, name="lmfleet proxy")
    except BaseException:
        server._sock.close()
        raise
    return server
