"""How `retrieval search` finds a running server for a collection: DIR/server.json (host, port, pid), written
by the server once it listens and removed when it stops. A file left by a killed server is ignored: its pid is
gone or its port does not answer /healthz. Standard library only: the client path must import nothing heavy."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

FILENAME = "server.json"
PROBE_SECONDS = 0.5  # a live server on loopback answers /healthz in milliseconds


def write(directory: str | os.PathLike, host: str, port: int) -> Path:
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
    os.replace(tmp, path)
    return path


def remove(directory: str | os.PathLike) -> None:
    path = Path(directory) / FILENAME
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():  # never remove a newer server's file
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def find(directory: str | os.PathLike) -> str | None:
    """The base URL of a live server for this collection, or None."""
    try:
        info = json.loads((Path(directory) / FILENAME).read_text())
        host, port, pid = str(info["host"]), int(info["port"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        return None
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=PROBE_SECONDS) as response:
            return url if response.status == 200 else None
    except OSError:
        return None
