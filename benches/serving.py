"""What the benchmark scripts share: a free port, and a visionserve process started and waited for
until ready (`start_server`), stopped by the caller with `.terminate()` / `.wait()`."""

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, args, timeout_s=600):
    """`binary ARGS --port P` on a free port; returns (process, "http://127.0.0.1:P") once
    /health/ready answers 200, or exits with the server's log if it stops first."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([binary, *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"server {args} exited:\n{log.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"server not ready in {timeout_s} s")
