"""`swinv2 serve`: a loaded classifier behind HTTP, as one process on uvicorn.

The order of a start: the serve extra is checked (`require_serve_extra`: one line naming it, before
anything is loaded), the weights are loaded and the runtime checked by the caller (`swinv2 serve` fails
in one line, exit 2, for a wrong file or a missing runtime), the address is bound (`listen`: one line
for an address in use), and only then does the server answer. The runtime is built and warmed up in a
thread while it does: `/health` says 503 "loading" until then, and a failure there ends the process in
one line too (`serve` raises it).

Why Starlette on uvicorn: measured on this project's 2-core machine against FastAPI and LitServe, the
same endpoints at 32 concurrent clients (benchmarks/serve_frameworks.py, docs/serving.md): plain
Starlette answered the most requests with the shortest latencies, and the app needs nothing FastAPI
adds (validation, OpenAPI) or LitServe's worker processes (a hop per request; the batching is ours).

Stopping. SIGTERM or SIGINT drains: new predictions are answered 503 and `/health` turns 503 at once,
uvicorn stops accepting connections, the requests in progress are answered (up to --timeout-s and a
few seconds), the batcher runs dry, and the process exits 0. uvicorn's own handler would re-raise the
signal after its shutdown (exit 143 for SIGTERM); a planned stop of a server is a success here. A
second signal stops at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..errors import InputError
from ..model.transformer import SwinTransformerV2
from ..preprocess import EvalPreprocess
from .runtime import Runtime, check_supported
from .service import ServeSettings

log = logging.getLogger(__name__)

# The import names of the serve extra's packages (pyproject.toml: swinv2[serve]).
EXTRA_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "multipart": "python-multipart"}


def require_serve_extra() -> None:
    """InputError (one line) naming the extra to install where a package of it is missing."""
    missing = [pkg for mod, pkg in EXTRA_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise InputError(
            f"swinv2 serve needs the serve extra ({', '.join(missing)} not installed): pip install 'swinv2[serve]'"
        )


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; InputError in one line where it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: SwinTransformerV2,
    prep: EvalPreprocess,
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    queue: int = 64,
    max_body_bytes: int = 20 << 20,
    timeout_s: float = 30.0,
    weights: str | os.PathLike | None = None,
    runtime: Runtime | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Serve `model` until SIGTERM / SIGINT; 0 after a drained stop. `runtime`: run that one instead of
    building `settings.runtime` (tests); `sock`: serve on that bound socket instead of (host, port).
    Raises InputError (one line) for what the user gave: an address in use, a runtime that cannot run
    here, a failed model load."""
    require_serve_extra()
    import uvicorn

    from .app import Limits, ServeApp
    from .service import Classifier

    if runtime is None and settings.runtime != "auto":
        check_supported(settings.runtime, settings.precision)  # a missing package: one line, before listening
    if settings.calib and settings.precision != "int8":
        raise InputError("--calib is for --precision int8")
    sock = sock or listen(host, port)
    limits = Limits(queue=queue, max_body_bytes=max_body_bytes, timeout_s=timeout_s)
    web = ServeApp(Classifier(model, prep, settings, weights=weights), limits, runtime=runtime)
    config = uvicorn.Config(
        web.app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(timeout_s) + 5,
        timeout_keep_alive=5,
        # connections and requests at once: beyond the queue, room for /health and
        # /metrics; more get uvicorn's own 503, so idle connections are bounded too
        limit_concurrency=queue + 64,
    )
    server = _draining_server(config, web)
    failed: list[BaseException] = []

    def stop_on_load_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    web.on_load_error = stop_on_load_error
    bound = sock.getsockname()
    print(
        f"swinv2 serve: http://{_url_host(bound[0])}:{bound[1]}/ serving {web.service.name}; the runtime "
        f"({settings.runtime} {settings.precision}) loads now, GET /health says 200 once it is ready",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        e = failed[0]
        if isinstance(e, (InputError, OSError)):
            raise e
        raise InputError(f"loading the model failed: {type(e).__name__}: {e}") from e
    print("swinv2 serve: stopped", file=sys.stderr, flush=True)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _draining_server(config: Any, web: Any) -> Any:
    """uvicorn's Server whose SIGTERM / SIGINT drains and ends in exit 0 (see the module docstring);
    made here, not at import, so that this module imports without the serve extra."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
                return
            web.drain()
            log.info("%s: draining %d requests in progress, refusing new ones", signal.Signals(sig).name, web.inflight)
            self.should_exit = True  # not recorded in _captured_signals: nothing is re-raised on exit

    return DrainingServer(config)
