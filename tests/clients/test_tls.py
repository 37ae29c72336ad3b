"""TLS and mutual TLS (--tls-cert, --tls-key, --tls-client-ca) as clients meet them: curl,
tritonclient over HTTPS and gRPC+TLS; under mTLS a client without a certificate is refused
everywhere but the probes, an expired certificate or one from another CA fails the handshake;
certificates rotate on SIGHUP without failing a request in flight; plain HTTP sent to a TLS
port gets a 400 at once.

The certificates are made here, in a temporary folder, with /usr/bin/openssl: a CA, a server
certificate for 127.0.0.1, a second one (rotation), a client certificate, an expired one
(`openssl ca` with fixed dates in 2020) and one from another CA."""
import http.client
import json
import os
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import start_server, stop_server
from v2helpers import MODEL, images_tensor, photo_bytes

OPENSSL = "/usr/bin/openssl"
CURL = "/usr/bin/curl"
PHOTO = "chelsea.png"
SERVER_SERIAL, ROTATED_SERIAL = 10, 11


def openssl(folder: Path, *args):
    done = subprocess.run([OPENSSL, *args], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def make_ca(folder: Path, name: str):
    openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def issue(folder: Path, ca: str, name: str, serial: int, usage: str, expired=False):
    """`name`.pem/.key signed by `ca`: for 127.0.0.1/localhost (serverAuth) or a client."""
    openssl(folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    extensions = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    if usage == "serverAuth":
        extensions.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    (folder / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    if not expired:
        openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                f"{ca}.key", "-set_serial", str(serial), "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem")
        return
    # `openssl x509` (3.0) only counts days from now: `openssl ca` takes fixed dates.
    db = folder / f"{name}-db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text(f"{serial:02X}\n")
    (folder / f"{name}.cnf").write_text(
        f"[ca]\ndefault_ca = test\n[test]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}\n"
        f"serial = {db}/serial\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n")
    openssl(folder, "ca", "-batch", "-config", f"{name}.cnf", "-cert", f"{ca}.pem", "-keyfile",
            f"{ca}.key", "-in", f"{name}.csr", "-startdate", "20200101000000Z", "-enddate",
            "20200102000000Z", "-extfile", f"{name}.ext", "-notext", "-out", f"{name}.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    issue(folder, "ca", "server", SERVER_SERIAL, "serverAuth")
    issue(folder, "ca", "rotated", ROTATED_SERIAL, "serverAuth")
    issue(folder, "ca", "client", 20, "clientAuth")
    issue(folder, "ca", "expired", 21, "clientAuth", expired=True)
    issue(folder, "other-ca", "stranger", 30, "clientAuth")
    return folder


def tls_args(certs: Path, serving: str):
    """Flags serving copies of the server certificate named `serving`, so that one server's
    rotation does not change another's files."""
    for suffix in ("pem", "key"):
        (certs / f"{serving}.{suffix}").write_bytes((certs / f"server.{suffix}").read_bytes())
    return ["--tls-cert", str(certs / f"{serving}.pem"), "--tls-key", str(certs / f"{serving}.key")]


@pytest.fixture(scope="module")
def tls_server(certs):
    srv = start_server(tls_args(certs, "serving"), ca=certs / "ca.pem")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def mtls_server(certs):
    srv = start_server([*tls_args(certs, "serving-mtls"), "--tls-client-ca", str(certs / "ca.pem")],
                       ca=certs / "ca.pem")
    yield srv
    stop_server(srv)


def curl(certs: Path, url: str, *args) -> subprocess.CompletedProcess:
    """curl trusting the test CA; stdout ends with the status code on a line of its own."""
    return subprocess.run([CURL, "-sS", "--max-time", "10", "--cacert", str(certs / "ca.pem"),
                           "-w", "\n%{http_code}", *args, url], capture_output=True, text=True)


def curl_status(done: subprocess.CompletedProcess) -> str:
    return done.stdout.rsplit("\n", 1)[-1]


def infer_http(addr: str, certs: Path, client: str = None):
    options = {"ca_certs": str(certs / "ca.pem")}
    if client:
        options.update(certfile=str(certs / f"{client}.pem"), keyfile=str(certs / f"{client}.key"))
    with httpclient.InferenceServerClient(url=addr, ssl=True, ssl_options=options) as triton:
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(images_tensor([PHOTO]))
        return triton.infer(MODEL, [inp]).as_numpy("probabilities")


def grpc_client(addr: str, certs: Path, client: str = None):
    keys = {}
    if client:
        keys = dict(private_key=str(certs / f"{client}.key"),
                    certificate_chain=str(certs / f"{client}.pem"))
    return grpcclient.InferenceServerClient(url=addr, ssl=True,
                                            root_certificates=str(certs / "ca.pem"), **keys)


def infer_grpc(addr: str, certs: Path, client: str = None):
    triton = grpc_client(addr, certs, client)
    try:
        inp = grpcclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(images_tensor([PHOTO]))
        return triton.infer(MODEL, [inp]).as_numpy("probabilities")
    finally:
        triton.close()


def assert_one_image(probabilities):
    assert probabilities.shape == (1, 1000)
    assert abs(float(np.sum(probabilities)) - 1.0) < 1e-3


def peer_serial(sock: ssl.SSLSocket) -> int:
    return int(sock.getpeercert()["serialNumber"], 16)


def new_connection_serial(addr: str, certs: Path) -> int:
    host, port = addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        connection.connect()
        return peer_serial(connection.sock)
    finally:
        connection.close()


# --- TLS ------------------------------------------------------------------------------------

def test_curl_over_https(tls_server, certs):
    ready = curl(certs, f"https://{tls_server.http}/v2/health/ready")
    assert curl_status(ready) == "200", ready.stderr
    (certs / PHOTO).write_bytes(photo_bytes(PHOTO))
    classified = curl(certs, f"https://{tls_server.http}/v1/models/{MODEL}/classify",
                      "-H", "Content-Type: application/octet-stream",
                      "--data-binary", f"@{certs / PHOTO}")
    assert curl_status(classified) == "200", (classified.stdout, classified.stderr)
    body = json.loads(classified.stdout.rsplit("\n", 1)[0])
    assert body["results"][0]["predictions"], body


def test_curl_negotiates_http2(tls_server, certs):
    """ALPN offers h2 on the HTTP port."""
    done = curl(certs, f"https://{tls_server.http}/health/live", "-o", "/dev/null",
                "-w", "%{http_version}")
    assert done.stdout.startswith("2"), (done.stdout, done.stderr)


def test_tritonclient_over_https_and_grpc_tls(tls_server, certs):
    assert_one_image(infer_http(tls_server.http, certs))
    assert_one_image(infer_grpc(tls_server.grpc, certs))


def test_an_untrusted_server_certificate_is_refused_by_clients(tls_server, certs):
    """The server really presents the CA's certificate: trusting another CA fails."""
    done = subprocess.run([CURL, "-sS", "--max-time", "10", "--cacert", str(certs / "other-ca.pem"),
                           f"https://{tls_server.http}/health/live"], capture_output=True, text=True)
    assert done.returncode != 0 and "certificate" in done.stderr.lower(), done.stderr


@pytest.mark.parametrize("port", ["http", "grpc"])
def test_plain_http_to_a_tls_port_gets_400_at_once(tls_server, port):
    addr = getattr(tls_server, port)
    start = time.monotonic()
    answer = requests.get(f"http://{addr}/v2/health/ready", timeout=5)
    assert time.monotonic() - start < 5
    assert answer.status_code == 400
    assert "HTTPS" in answer.text, answer.text
    assert answer.headers.get("Connection") == "close"


def test_a_plaintext_grpc_client_fails_at_once(tls_server):
    """A gRPC client without TLS gets an error, not a hang."""
    start = time.monotonic()
    triton = grpcclient.InferenceServerClient(url=tls_server.grpc)
    try:
        with pytest.raises(InferenceServerException) as refused:
            triton.is_server_live(client_timeout=5)
    finally:
        triton.close()
    assert time.monotonic() - start < 5
    assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE), refused.value


def test_bad_files_stop_the_start_up_naming_the_flag_and_the_file(certs):
    binary = os.environ.get("VISIONSERVE_BIN", "target/release/visionserve")
    for flags, named in [
        (["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "absent.key")],
         ["--tls-key", "absent.key"]),
        (["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "client.key")],
         ["--tls-cert", "--tls-key", "does not belong"]),
        (["--tls-cert", str(certs / "server.pem")], ["--tls-cert needs --tls-key"]),
    ]:
        done = subprocess.run([binary, "--port", "0", "--model", "m=/nonexistent", *flags],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        for words in named:
            assert words in done.stderr, (flags, done.stderr)


def test_certificates_rotate_on_sighup_without_failing_requests(tls_server, certs):
    """A keep-alive connection keeps classifying across a rotation (it keeps its handshake's
    certificate); new connections get the new one. A reload of files that do not match keeps
    the certificate in force."""
    host, port = tls_server.http.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    connection.connect()
    assert peer_serial(connection.sock) == SERVER_SERIAL
    first_socket = connection.sock
    outcomes, stop = [], threading.Event()

    def classify_until_stopped():
        while not stop.is_set():
            try:
                connection.request("POST", f"/v1/models/{MODEL}/classify", body=photo_bytes(PHOTO),
                                   headers={"Content-Type": "application/octet-stream"})
                response = connection.getresponse()
                response.read()
                outcomes.append(response.status)
            except Exception as e:  # noqa: BLE001  (any failure is what the test looks for)
                outcomes.append(repr(e))
                return

    flowing = threading.Thread(target=classify_until_stopped, daemon=True)
    flowing.start()
    try:
        time.sleep(0.5)
        # Replace the files as a deploy would (each rename is atomic), then SIGHUP.
        for suffix in ("pem", "key"):
            staged = certs / f"staged.{suffix}"
            staged.write_bytes((certs / f"rotated.{suffix}").read_bytes())
            os.replace(staged, certs / f"serving.{suffix}")
        tls_server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while new_connection_serial(tls_server.http, certs) != ROTATED_SERIAL:
            assert time.monotonic() < deadline, f"no new certificate after SIGHUP\n{tls_server.log(30)}"
            time.sleep(0.1)
        time.sleep(0.5)  # requests keep flowing after the reload too
    finally:
        stop.set()
        flowing.join(30)
    connection.close()
    assert outcomes and all(o == 200 for o in outcomes), outcomes
    assert len(outcomes) >= 3, outcomes
    assert connection.sock is None and first_socket is not None

    # A key that does not belong to the certificate: the reload fails, the old one stays.
    (certs / "serving.key").write_bytes((certs / "client.key").read_bytes())
    tls_server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificates not reloaded" not in tls_server.log(50):
        assert time.monotonic() < deadline, tls_server.log(30)
        time.sleep(0.1)
    assert new_connection_serial(tls_server.http, certs) == ROTATED_SERIAL


# --- mutual TLS -----------------------------------------------------------------------------

def test_no_client_certificate_is_refused_but_probes_answer(mtls_server, certs):
    for probe in ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready",
                  f"/v2/models/{MODEL}/ready"]:
        done = curl(certs, f"https://{mtls_server.http}{probe}")
        assert curl_status(done) == "200", (probe, done.stdout, done.stderr)
    for route in ["/v1/models", f"/v2/models/{MODEL}", "/metrics"]:
        refused = requests.get(f"https://{mtls_server.http}{route}", verify=str(certs / "ca.pem"),
                               timeout=10)
        assert refused.status_code == 403, (route, refused.status_code, refused.text)
        assert "--tls-client-ca" in refused.json()["error"], refused.text
    with pytest.raises(InferenceServerException) as http_refused:
        infer_http(mtls_server.http, certs)
    assert http_refused.value.status() == "403"


def test_grpc_without_a_client_certificate_is_unauthenticated_but_health_answers(mtls_server, certs):
    with pytest.raises(InferenceServerException) as refused:
        infer_grpc(mtls_server.grpc, certs)
    assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert "--tls-client-ca" in refused.value.message()
    triton = grpc_client(mtls_server.grpc, certs)
    try:
        assert triton.is_server_live()
        assert triton.is_server_ready()
    finally:
        triton.close()


def test_a_client_certificate_from_the_ca_is_served(mtls_server, certs):
    client = ["--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")]
    done = curl(certs, f"https://{mtls_server.http}/v1/models", *client)
    assert curl_status(done) == "200", (done.stdout, done.stderr)
    assert_one_image(infer_http(mtls_server.http, certs, client="client"))
    assert_one_image(infer_grpc(mtls_server.grpc, certs, client="client"))


@pytest.mark.parametrize("client", ["expired", "stranger"])
def test_an_expired_or_foreign_client_certificate_fails_the_handshake(mtls_server, certs, client):
    presented = ["--cert", str(certs / f"{client}.pem"), "--key", str(certs / f"{client}.key")]
    done = curl(certs, f"https://{mtls_server.http}/health/live", *presented)
    # No HTTP status at all: the handshake failed (even the probe, since a certificate was sent).
    assert done.returncode != 0 and curl_status(done) == "000", (done.returncode, done.stderr)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(f"https://{mtls_server.http}/v1/models", verify=str(certs / "ca.pem"),
                     cert=(str(certs / f"{client}.pem"), str(certs / f"{client}.key")), timeout=10)
    with pytest.raises(InferenceServerException) as refused:
        infer_grpc(mtls_server.grpc, certs, client=client)
    assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE), refused.value
