"""A real server on a loopback port over a tiny collection (test-micro, random weights: no download)."""

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.cli.conftest import make_images

ODD_NAMES = [b"bad\xff\xfename.png", b"x[bold]y[red]z.png", b"tab\there.png"]


def build_collection(root: Path) -> SimpleNamespace:
    from retrieval.config import EncoderConfig
    from retrieval.pipelines.index_folder import index_folder

    folder, db = root / "photos", root / "db"
    paths = [str(p) for p in make_images(folder, 24)]
    for i, name in enumerate(ODD_NAMES):
        path = os.path.join(os.fsencode(folder), name)
        Image.new("RGB", (40, 30), (80 * i, 20, 160)).save(path)
        paths.append(os.fsdecode(path))
    cfg = EncoderConfig(arch="test-micro", pretrained="none", device="cpu")
    index_folder([str(folder)], db, cfg, progress=False)
    return SimpleNamespace(folder=folder, db=db, paths=paths)


class LiveServer:
    """uvicorn in a thread, on a socket bound to a free port, exactly as `retrieval serve` runs it."""

    def __init__(self, db: Path, **overrides):
        import uvicorn

        from retrieval.serve import discovery
        from retrieval.serve.app import create_app
        from retrieval.serve.config import ServeConfig
        from retrieval.serve.engine import Engine
        from retrieval.serve.server import bind

        self.engine = Engine(db, ServeConfig(port=0, **overrides))
        sock = bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(
            self.engine,
            on_start=lambda: discovery.write(db, "127.0.0.1", port),
            on_stop=lambda: discovery.remove(db),
        )
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="package")
def collection(tmp_path_factory):
    return build_collection(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="package")
def live(collection):
    server = LiveServer(collection.db, batch_wait_ms=20.0)  # 20 ms: concurrent test queries meet in a batch
    yield server
    server.stop()


@pytest.fixture
def http(live):
    import httpx

    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="package")
def http_session(live):
    """One client for a whole module: hypothesis runs a test body many times under one fixture value."""
    import httpx

    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client
