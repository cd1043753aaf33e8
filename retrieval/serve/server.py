"""Run the server: bind first (so the port is known and a second server fails at once), load the collection
and model once, announce the server in the collection (discovery.py), serve until stopped."""

from __future__ import annotations

import os
import socket
import sys

from retrieval.config import EncoderConfig
from retrieval.errors import UserError
from retrieval.serve import discovery
from retrieval.serve.config import ServeConfig


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(2048)
    return sock


def serve(db: str | os.PathLike, cfg: ServeConfig, encoder_cfg: EncoderConfig | None = None) -> None:
    import uvicorn

    from retrieval.serve.app import create_app
    from retrieval.serve.engine import Engine

    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    engine = Engine(db, cfg, encoder_cfg)

    def started() -> None:
        try:
            discovery.write(db, host, port)
        except OSError as e:  # a read-only collection: the server works, `search` just won't find it
            print(f"note: cannot write {discovery.FILENAME} in {db} ({e.strerror})", file=sys.stderr)
        where = "" if host in ("127.0.0.1", "::1") else " (reachable from other machines)"
        print(f"serving {db} at http://{host}:{port}{where}", file=sys.stderr, flush=True)

    app = create_app(engine, on_start=started, on_stop=lambda: discovery.remove(db))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
