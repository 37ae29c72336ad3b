"""Starts one visionserve (HTTP + gRPC, model lite0) for the whole session (see server.py)."""
import pytest

from server import start_server, stop_server  # noqa: F401  (test_auth.py imports them from here)
from v2helpers import PHOTOS, classify_v1

@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def http_addr(server) -> str:
    return server.http


@pytest.fixture(scope="session")
def grpc_addr(server) -> str:
    return server.grpc


@pytest.fixture(scope="session")
def v1_results(http_addr) -> dict:
    """The native /v1 API's top-5 for each test photo: {photo: [(index, label, score)]}."""
    return {photo: classify_v1(http_addr, photo) for photo in PHOTOS}
