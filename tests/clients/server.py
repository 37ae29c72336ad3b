"""Start and stop one visionserve process for a test session (shared by tests/clients and
tests/ops).

    VISIONSERVE_BIN         the release binary (default target/release/visionserve)
    VISIONSERVE_TEST_MODEL  the lite0 model folder (default weights/tf_efficientnet_lite0)
    VISIONSERVE_TEST_DATA   make test-data's output (default target/test-data)
"""
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
MODEL = "lite0"


def data_dir() -> Path:
    return Path(os.environ.get("VISIONSERVE_TEST_DATA", REPO / "target" / "test-data"))


def model_dir() -> Path:
    return Path(os.environ.get("VISIONSERVE_TEST_MODEL", REPO / "weights" / "tf_efficientnet_lite0"))


STARTUP_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 30


@dataclass
class Server:
    http: str  # "127.0.0.1:PORT"
    grpc: str
    proc: subprocess.Popen
    lines: list = field(default_factory=list)

    def log(self, last: int = 200) -> str:
        return "\n".join(self.lines[-last:])


def _field(record: dict, key: str):
    # --log-format json flattens the event; accept tracing's nested "fields" too.
    if key in record:
        return record[key]
    return (record.get("fields") or {}).get(key)


def start_server(extra_args=(), ca=None) -> Server:
    """`ca`: the server speaks TLS (--tls-cert); readiness is polled over HTTPS, trusting
    this CA file."""
    binary = Path(os.environ.get("VISIONSERVE_BIN", REPO / "target" / "release" / "visionserve"))
    for path, what in [(binary, "VISIONSERVE_BIN"), (model_dir(), "VISIONSERVE_TEST_MODEL"),
                       (data_dir() / "lite0.json", "VISIONSERVE_TEST_DATA")]:
        if not path.exists():
            pytest.fail(f"{what}: {path} does not exist (run through `make`)", pytrace=False)
    cmd = [str(binary), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0",
           "--model", f"{MODEL}={model_dir()}", "--log-format", "json", *extra_args]
    # stderr carries the log; stdout is folded into the same pipe so nothing is lost.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list = []
    addresses: dict = {}
    seen = threading.Condition()

    def drain():
        for raw in proc.stdout:  # keeps reading until the process exits: the pipe never fills
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with seen:
                lines.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                message = _field(record, "message")
                if message == "listening" and "http" not in addresses:
                    addresses["http"] = _field(record, "address")
                elif message == "gRPC listening" and "grpc" not in addresses:
                    addresses["grpc"] = _field(record, "address")
                seen.notify_all()
        with seen:
            seen.notify_all()

    threading.Thread(target=drain, name="visionserve-log", daemon=True).start()
    server = Server(http="", grpc="", proc=proc, lines=lines)

    def give_up(why: str):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pytest.fail(f"visionserve {why}\ncommand: {' '.join(cmd)}\nlog:\n{server.log()}", pytrace=False)

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with seen:
        while not ("http" in addresses and "grpc" in addresses):
            if proc.poll() is not None:
                give_up(f"exited with {proc.returncode} before listening")
            if time.monotonic() > deadline:
                give_up(f"did not log both 'listening' and 'gRPC listening' in {STARTUP_TIMEOUT_S} s")
            seen.wait(0.5)
    server.http, server.grpc = addresses["http"], addresses["grpc"]

    while True:
        try:
            scheme = "https" if ca else "http"
            ready = requests.get(f"{scheme}://{server.http}/v2/health/ready", timeout=5,
                                 verify=str(ca) if ca else True)
            if ready.status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            give_up(f"exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            give_up(f"was not ready (GET /v2/health/ready) within {STARTUP_TIMEOUT_S} s")
        time.sleep(0.2)
    return server


def stop_server(srv: Server):
    """SIGTERM; the server must exit 0 within the shutdown timeout."""
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait(10)
        pytest.fail(f"visionserve did not exit within {SHUTDOWN_TIMEOUT_S} s of SIGTERM\nlog:\n{srv.log()}",
                    pytrace=False)
    assert code == 0, f"visionserve exited with {code} after SIGTERM\nlog:\n{srv.log()}"
