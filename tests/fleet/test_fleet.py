"""A fleet behind a real load balancer (issue #27, part 7): three visionserve replicas on loopback
ports behind nginx (deploy/fleet/nginx.conf), steady traffic through nginx, then

1. a rolling restart: SIGTERM one replica, wait for it to drain and exit, start it again, wait
   until it is ready, then the next;
2. a rolling model rollout through the admin API, replica by replica (version 2 of the model,
   loaded and switched to while the old version serves);
3. SIGKILL of one replica under load, then starting it again.

Expected: no failed request through nginx during 1 and 2. During 3 only the requests in flight on
the killed replica may fail; the test counts them and prints every phase's figures.

    make test-fleet          # installs Debian's nginx-light, builds, runs this
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
MODEL = os.environ.get("VISIONSERVE_TEST_MODEL", str(REPO / "weights" / "tf_efficientnet_lite0"))
PHOTO = Path(os.environ.get("VISIONSERVE_TEST_DATA", str(REPO / "target" / "test-data"))) / "photos" / "chelsea.jpg"
ADMIN = "fleet-admin-token"
CLIENTS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"replica on {port} not ready in {timeout} s")


class Replica:
    def __init__(self, port: int, logs: Path):
        self.port, self.logs, self.proc = port, logs, None

    def start(self):
        log = open(self.logs / f"replica-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [BINARY, "--host", "127.0.0.1", "--port", str(self.port), "--model", f"lite0={MODEL}",
             "--model-control", "explicit", "--admin-token", ADMIN, "--shutdown-timeout", "20",
             "--access-log", "off"],
            stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.port)

    def stop(self, sig=signal.SIGTERM) -> float:
        """Signal it and wait for it to exit; returns how long that took."""
        started = time.time()
        self.proc.send_signal(sig)
        self.proc.wait(60)
        return time.time() - started


class Traffic:
    """CLIENTS threads posting the photo through nginx, each outcome tagged with the phase."""

    def __init__(self, url: str):
        self.url, self.phase, self.stop = url, "warm-up", threading.Event()
        self.outcomes = Counter()
        self.lock = threading.Lock()
        self.body = PHOTO.read_bytes()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]

    def run(self):
        session = requests.Session()
        while not self.stop.is_set():
            phase = self.phase
            try:
                answer = session.post(self.url, data=self.body, timeout=70,
                                      headers={"Content-Type": "image/jpeg"})
                outcome = str(answer.status_code)
            except requests.RequestException as e:
                outcome = type(e).__name__
            with self.lock:
                self.outcomes[(phase, outcome)] += 1

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(80)

    def of(self, phase: str) -> Counter:
        return Counter({outcome: n for (p, outcome), n in self.outcomes.items() if p == phase})


@pytest.fixture
def fleet():
    for tool in ("nginx",):
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            pytest.fail("nginx is missing: `make test-fleet` installs Debian's nginx-light", pytrace=False)
    prefix = Path(tempfile.mkdtemp(prefix="visionserve-fleet-"))
    # nginx's workers run as an unprivileged user when it starts as root: they must reach the
    # temporary files under the prefix.
    prefix.chmod(0o755)
    replicas = [Replica(free_port(), prefix) for _ in range(3)]
    for r in replicas:
        r.start()
    listen = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=1 fail_timeout=2s;" for r in replicas)
    conf = (REPO / "deploy" / "fleet" / "nginx.conf").read_text()
    conf = conf.replace("{{LISTEN}}", str(listen)).replace("{{SERVERS}}", servers).replace("{{PREFIX}}", str(prefix))
    (prefix / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    balancer = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=open(prefix / "nginx.stderr", "wb"))
    deadline = time.time() + 20
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{listen}/health/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.time() > deadline or balancer.poll() is not None:
            errors = [(prefix / name).read_text() for name in ("nginx.stderr", "error.log") if (prefix / name).exists()]
            pytest.fail(f"nginx did not start: {errors}", pytrace=False)
        time.sleep(0.2)
    yield replicas, f"http://127.0.0.1:{listen}", prefix
    balancer.terminate()
    balancer.wait(10)
    for r in replicas:
        if r.proc and r.proc.poll() is None:
            r.stop()
    shutil.rmtree(prefix, ignore_errors=True)


def test_rolling_restart_rollout_and_a_killed_replica_behind_nginx(fleet):
    replicas, base, prefix = fleet
    traffic = Traffic(f"{base}/v1/classify")
    traffic.start()
    time.sleep(3)
    report = []

    traffic.phase = "rolling restart"
    for r in replicas:
        drained = r.stop(signal.SIGTERM)
        r.start()
        report.append(f"replica {r.port}: drained and exited in {drained:.1f} s, ready again")
        time.sleep(1)

    traffic.phase = "rolling rollout"
    for r in replicas:
        answer = requests.post(f"http://127.0.0.1:{r.port}/v1/models", timeout=300,
                               headers={"Authorization": f"Bearer {ADMIN}"},
                               json={"name": "lite0", "source": MODEL, "version": "2"})
        assert answer.status_code == 201, answer.text
        served = requests.get(f"http://127.0.0.1:{r.port}/v1/models/lite0", timeout=10).json()
        assert served["version"] == "2", served
        report.append(f"replica {r.port}: version 2 serving")

    traffic.phase = "SIGKILL"
    killed = replicas[0]
    killed.stop(signal.SIGKILL)
    time.sleep(3)
    traffic.phase = "after SIGKILL"
    killed.start()
    time.sleep(2)
    traffic.finish()

    phases = ["warm-up", "rolling restart", "rolling rollout", "SIGKILL", "after SIGKILL"]
    for phase in phases:
        report.append(f"{phase}: {dict(traffic.of(phase))}")
    print("\n".join(report))
    (Path(os.environ.get("FLEET_REPORT", prefix / "report.txt"))).write_text("\n".join(report) + "\n")
    for phase in ("warm-up", "rolling restart", "rolling rollout", "after SIGKILL"):
        outcomes = traffic.of(phase)
        assert outcomes["200"] > 0, (phase, outcomes)
        assert set(outcomes) == {"200"}, f"{phase}: failed requests through nginx: {dict(outcomes)}"
    # While a replica is killed, only its in-flight requests may fail: at most one per client.
    killed_phase = traffic.of("SIGKILL")
    failed = sum(n for outcome, n in killed_phase.items() if outcome != "200")
    assert failed <= CLIENTS, dict(killed_phase)
    assert killed_phase["200"] > 0
