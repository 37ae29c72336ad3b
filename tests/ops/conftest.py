"""Operator tooling tests: they start the release binary like tests/clients does (server.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))

from server import start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return f"http://{server.http}"
