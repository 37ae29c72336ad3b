"""deploy/observability against a real Prometheus (Debian's `prometheus` package).

What is checked:

- `promtool check config` on the shipped prometheus.yml, `promtool check rules` on alerts.yml and
  `promtool test rules` on alerts.test.yml, which must hold a firing and a quiet case for every
  alert;
- the dashboard JSON loads, its panels and queries use the datasource that
  grafana/provisioning/datasources provisions, and compose.yaml mounts what exists;
- live: a visionserve started for this module (with an API key and a small queue limit, so that
  401 and 429 happen and their series exist) is scraped every second by `prometheus` running
  on a temporary copy of prometheus.yml (only the target and the intervals rewritten, rule
  files pointed at the shipped alerts.yml). About 20 s of traffic: classify POSTs with real
  photos, non-image bodies (415), an unknown model (404), requests without a key (401), a
  1 ms deadline (504) and bursts over the queue limit (429). Then, through the HTTP API:
    * every expression in the dashboard (every panel's targets, panels nested in collapsed
      rows included, and the template variables' `label_values(...)`) and in alerts.yml
      evaluates without error and returns at least one finite sample. An alert's expression
      returns nothing while it does not fire, so it is also evaluated with each comparison
      made a `bool` comparison (`x > 0.05` -> `x > bool 0.05`), which keeps every series
      the comparison would filter: that must return data;
    * every series selector in those expressions matches series, so a mistyped label value
      is caught even where `or ... * 0` would hide it in the result;
    * Prometheus loaded every rule and evaluated it without error.

Exemption: panels in the dashboard row titled "GPU" query the GPU gauges, which the server
exports only on CUDA machines. They must evaluate without error but may return nothing; they
may only use `visionserve_gpu_*` metrics, and no other panel may.

Dashboard variables are substituted the way Grafana does with the shipped defaults: a variable
with "All" selectable becomes its allValue (`.*`), any other its saved current value
(`job` -> `visionserve`), and `$__rate_interval` becomes 1m (Grafana's floor for it, four
times the 15 s scrape interval the provisioned datasource declares). Any other `$` left over
fails the test.
"""
import json
import math
import mimetypes
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pytest
import requests
import yaml

from server import start_server, stop_server

# Not imported from v2helpers, which needs numpy (not in the ops venv).
REPO = Path(__file__).resolve().parents[2]
MODEL = "lite0"  # the name tests/clients/server.py serves the test model under


@lru_cache(maxsize=None)
def photo_bytes(name: str) -> bytes:
    data = Path(os.environ.get("VISIONSERVE_TEST_DATA", REPO / "target" / "test-data"))
    return (data / "photos" / name).read_bytes()


OBS = REPO / "deploy" / "observability"
PROMETHEUS_YML = OBS / "prometheus.yml"
ALERTS = OBS / "alerts.yml"
ALERT_TESTS = OBS / "alerts.test.yml"
DASHBOARD = OBS / "grafana" / "dashboards" / "visionserve.json"
DATASOURCES = OBS / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = OBS / "grafana" / "provisioning" / "dashboards" / "visionserve.yaml"
COMPOSE = OBS / "compose.yaml"

JOB = "visionserve"
GPU_ROW = "GPU"
GPU_METRIC_PREFIX = "visionserve_gpu_"
RATE_INTERVAL = "1m"

API_KEY = "observability-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Small enough that a burst of 8-image requests overflows it (429 overloaded).
MAX_QUEUE_IMAGES = 8
TRAFFIC_S = 20
PHOTOS = ["rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png", "chelsea.jpg", "camera.png"]
SMALL_PHOTOS = ["chelsea.jpg", "chelsea_progressive.jpg", "camera_gray.jpg", "chelsea_444.jpg"]


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.fail(f"{name} not found: install Debian's prometheus package (make test-deps)", pytrace=False)
    return path


def run_promtool(*args, cwd=OBS) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------
# Expressions: where they are, substitution, a small PromQL scanner
# ------------------------------------------------------------------------------------------

@dataclass
class Expr:
    where: str  # a human-readable location, for failure messages
    expr: str  # as written in the file
    query: str  # what is sent to Prometheus (variables substituted)
    gpu: bool = False
    alert: bool = False


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> list:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict):
    """Every panel (rows excluded) with the title of the row it sits in: a collapsed row holds
    its panels in `panels`, an open one is followed by them in the top-level list."""
    row = None
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row = panel.get("title")
            for inner in panel.get("panels") or []:
                yield inner, row
        else:
            yield panel, row


def variable_values(dashboard: dict) -> dict:
    values = {"__rate_interval": RATE_INTERVAL}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        if var.get("includeAll"):
            assert var.get("allValue"), f"variable {var['name']}: set an allValue (e.g. .*) for All"
            values[var["name"]] = var["allValue"]
        else:
            current = var["current"]["value"]
            values[var["name"]] = current[0] if isinstance(current, list) else current
    return values


VAR_RE = re.compile(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: dict) -> str:
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}: "
                                 "teach the test how Grafana substitutes it")
        return values[name]
    out = VAR_RE.sub(repl, expr)
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)


def dashboard_expressions(dashboard: dict):
    values = variable_values(dashboard)
    for panel, row in dashboard_panels(dashboard):
        for target in panel.get("targets") or []:
            if "expr" not in target:
                continue
            where = f"dashboard panel {panel.get('title')!r} (row {row!r}) target {target.get('refId')}"
            yield Expr(where, target["expr"], substitute(target["expr"], values), gpu=row == GPU_ROW)
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES_RE.match(query)
        assert m, f"variable {var['name']}: only label_values(selector, label) queries are checked: {query!r}"
        selector, label = m.groups()
        # What Grafana asks Prometheus for: the label's values on the selector's series.
        yield Expr(f"dashboard variable {var['name']}", query,
                   f"count by ({label}) ({substitute(selector, values)})")


def alert_expressions():
    for rule in load_rules():
        name = rule.get("alert") or rule.get("record")
        yield Expr(f"alerts.yml rule {name}", rule["expr"], rule["expr"], alert="alert" in rule)


TOKEN_RE = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|[^{}"'`])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<cmp>==|!=|>=|<=|>|<)
  | (?P<op>=~|!~|[-+*/%^=@])
  | (?P<lparen>\() | (?P<rparen>\)) | (?P<comma>,)
""", re.X)

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def tokens(expr: str):
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        assert m, f"cannot scan {expr!r} at {pos}: {expr[pos:pos + 20]!r}"
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


def selectors(expr: str):
    """The series selectors of an expression: `name`, `name{...}` or `{...}`."""
    toks = tokens(expr)
    found, i = [], 0
    while i < len(toks):
        kind, text, _, _ = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None, 0, 0)
        if kind == "ident" and text in LABEL_LISTS and nxt[0] == "lparen":
            # Skip the label list: by (job, model) names labels, not metrics.
            depth, i = 0, i + 1
            while True:
                if toks[i][0] == "lparen":
                    depth += 1
                elif toks[i][0] == "rparen":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
        elif kind == "ident" and text not in KEYWORDS and nxt[0] != "lparen" and nxt[1] not in ("by", "without"):
            # (not a function call, nor an aggregation written `sum by (...) (...)`)
            if nxt[0] == "matchers":
                found.append(text + nxt[1])
                i += 1
            else:
                found.append(text)
        elif kind == "matchers":
            found.append(text)
        i += 1
    return found


def metric_names(expr: str):
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s).group() for s in selectors(expr) if not s.startswith("{")}


def with_bool_comparisons(expr: str) -> str:
    """`a > 0.05 and b >= 10` -> `a > bool 0.05 and b >= bool 10`: comparisons keep every series
    (as 0 or 1) instead of dropping those that fail, so an alert that does not fire still shows
    whether its signal has data."""
    toks = tokens(expr)
    out, last = [], 0
    for i, (kind, _, _, end) in enumerate(toks):
        if kind == "cmp" and not (i + 1 < len(toks) and toks[i + 1][1] == "bool"):
            out.append(expr[last:end] + " bool")
            last = end
    out.append(expr[last:])
    return "".join(out)


# ------------------------------------------------------------------------------------------
# Static checks (no server)
# ------------------------------------------------------------------------------------------

def test_promtool_checks_the_shipped_config_and_rules():
    for args in (["check", "config", PROMETHEUS_YML.name], ["check", "rules", ALERTS.name]):
        result = run_promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_promtool_unit_tests_pass_and_cover_every_alert():
    result = run_promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}\n{result.stderr}"
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    fires, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test") or []:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), f"alerts without a firing case in {ALERT_TESTS.name}"
    assert alerts - quiet == set(), f"alerts without a quiet case in {ALERT_TESTS.name}"
    readme = (OBS / "README.md").read_text()
    assert [a for a in sorted(alerts) if a not in readme] == [], "alerts the README does not explain"


def test_dashboard_uses_the_provisioned_datasource():
    dashboard = load_dashboard()
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus", source
    uid = source["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds_vars = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds_vars) == 1 and ds_vars[0]["query"] == "prometheus", ds_vars
    ds_var = ds_vars[0]
    assert ds_var["current"]["value"] == uid, f"the datasource variable defaults to {ds_var['current']}, not {uid}"
    allowed = {uid, f"${{{ds_var['name']}}}", f"${ds_var['name']}"}

    def check(obj, where):
        ds = obj.get("datasource")
        assert isinstance(ds, dict), f"{where}: datasource {ds!r}, want {{type: prometheus, uid: {uid} or the variable}}"
        assert ds.get("type") == "prometheus" and ds.get("uid") in allowed, f"{where}: datasource {ds}"

    ids, count = set(), 0
    for panel, row in dashboard_panels(dashboard):
        where = f"panel {panel.get('title')!r} (row {row!r})"
        assert panel.get("id") not in ids, f"{where}: duplicate id {panel.get('id')}"
        ids.add(panel.get("id"))
        if panel.get("type") == "text":
            continue
        assert panel.get("targets"), f"{where}: no queries"
        check(panel, where)
        for target in panel["targets"]:
            check(target, f"{where} target {target.get('refId')}")
            assert target.get("expr", "").strip(), f"{where} target {target.get('refId')}: no expr"
        count += 1
    for var in variables.values():
        if var["type"] == "query":
            check(var, f"variable {var['name']}")
    assert count >= 20, f"only {count} panels"
    # GPU panels sit in their own row and are the only ones querying the GPU gauges (the data
    # check exempts that row; nothing else may hide there).
    for e in dashboard_expressions(dashboard):
        gpu_metrics = {m for m in metric_names(e.query) if m.startswith(GPU_METRIC_PREFIX)}
        if e.gpu:
            assert metric_names(e.query) == gpu_metrics, f"{e.where}: non-GPU metric in the GPU row: {e.expr}"
        else:
            assert not gpu_metrics, f"{e.where}: GPU metric outside the GPU row: {e.expr}"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert providers and all(p["type"] == "file" for p in providers), providers


def test_compose_file_wires_the_pieces_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"visionserve", "prometheus", "grafana"} <= set(services), services.keys()
    vs = services["visionserve"]
    assert vs["image"] == "visionserve:latest"
    assert (OBS / vs["build"]["context"] / vs["build"]["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    named_volumes = set(compose.get("volumes") or {})
    mounts = {}
    for name, svc in services.items():
        for volume in svc.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (OBS / source).exists(), f"{name}: mounts {source}, which does not exist"
                mounts[target] = (OBS / source).resolve()
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
    # Prometheus reads the shipped config and rules where the config says they are.
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML.resolve()
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config_arg = [a for a in services["prometheus"]["command"] if a.startswith("--config.file=")]
    assert config_arg == ["--config.file=/etc/prometheus/prometheus.yml"], config_arg
    for rule_file in config["rule_files"]:
        assert mounts[str(Path("/etc/prometheus") / rule_file)] == (OBS / rule_file).resolve()
    # It scrapes the compose service on the port the image listens on.
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["visionserve:8080"], targets
    # Grafana: provisioning mounted, the datasource points at the prometheus service, the
    # dashboard provider's path is where the dashboards are mounted.
    assert mounts["/etc/grafana/provisioning"] == (OBS / "grafana" / "provisioning").resolve()
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090", source["url"]
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or Path(home).parent == Path(provider["options"]["path"]), home


def test_the_scanner_finds_selectors_and_comparisons():
    expr = ('(sum by (job, model) (rate(a_total{outcome="x>y", m=~"$model"}[5m])) or '
            'sum by (job) (rate(b_total[5m])) * 0) / on (job) group_left c > 0.05 '
            'and d{le="+Inf"} >= bool 10 unless {__name__="e"} == 1')
    assert selectors(expr) == ['a_total{outcome="x>y", m=~"$model"}', "b_total", "c", 'd{le="+Inf"}',
                               '{__name__="e"}']
    assert with_bool_comparisons(expr).count(" bool") == 3
    assert 'x>y' in with_bool_comparisons(expr)


# ------------------------------------------------------------------------------------------
# The live stack: visionserve, traffic, Prometheus
# ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path
    statuses: Counter = field(default_factory=Counter)
    timings: dict = field(default_factory=dict)  # seconds per phase of the set-up, for the log

    def api(self, path: str, **params):
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else {
            "status": "error", "error": f"HTTP {r.status_code}: {r.text[:200]}"}

    def query(self, q: str):
        return self.api("query", query=q)

    def scalar(self, q: str):
        body = self.query(q)
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def prometheus_config(target: str) -> dict:
    """The shipped prometheus.yml, scraping `target` every second, with its rule files made
    absolute (they are relative to the shipped file)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str((OBS / f).resolve()) for f in config["rule_files"]]
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1, f"prometheus.yml needs exactly one job named {JOB}"
    job = jobs[0]
    for key in ("scrape_interval", "scrape_timeout"):
        if key in job:
            job[key] = "1s"
    labels = [sc.get("labels") for sc in job["static_configs"] if sc.get("labels")]
    job["static_configs"] = [{"targets": [target], **({"labels": labels[0]} if labels else {})}]
    return config


def wait_for(what: str, check, timeout: float, prom: Prometheus = None, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (requests.RequestException, KeyError, IndexError, ValueError):
            value = None
        if value:
            return value
        if prom is not None and prom.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {prom.proc.returncode}\n{prom.tail()}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\nprometheus log:\n{prom.tail()}" if prom else ""),
                        pytrace=False)
        time.sleep(interval)


def classify(session: requests.Session, base: str, photos, model=MODEL, headers=AUTH, **params):
    """The status code, or the name of the exception (counted too, so that it shows)."""
    url = f"{base}/v1/models/{model}/classify"
    try:
        if len(photos) == 1:
            r = session.post(url, params=params, data=photo_bytes(photos[0]), timeout=60,
                             headers={**headers, "Content-Type": "application/octet-stream"})
        else:
            files = [("image", (p, photo_bytes(p), mimetypes.guess_type(p)[0] or "application/octet-stream"))
                     for p in photos]
            r = session.post(url, params=params, files=files, headers=headers, timeout=60)
    except requests.RequestException as err:
        return type(err).__name__
    return r.status_code


def drive_traffic(base: str, seconds: float) -> Counter:
    """Successful classifications from two clients, plus once a second a bad body (415), an
    unknown model (404), a missing key (401) and a 1 ms deadline (504), and every few seconds a
    burst of full-queue requests (429)."""
    statuses, lock = Counter(), threading.Lock()
    stop = time.monotonic() + seconds

    def count(code):
        with lock:
            statuses[code] += 1

    def client(offset):
        with requests.Session() as s:
            i = offset
            while time.monotonic() < stop:
                photos = [PHOTOS[i % len(PHOTOS)]] if i % 4 else [PHOTOS[(i + k) % len(PHOTOS)] for k in range(3)]
                count(classify(s, base, photos))
                i += 1

    def burst(pool):
        # Small files: the refused requests are answered before their bodies are read.
        full = [SMALL_PHOTOS[k % len(SMALL_PHOTOS)] for k in range(MAX_QUEUE_IMAGES)]
        for code in pool.map(lambda _: classify(requests, base, full), range(6)):
            count(code)

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for w in workers:
        w.start()
    with requests.Session() as s, ThreadPoolExecutor(6) as pool:
        tick = 0
        while time.monotonic() < stop:
            try:
                count(s.post(f"{base}/v1/models/{MODEL}/classify", data=b"not an image, just text",
                             headers={**AUTH, "Content-Type": "application/octet-stream"}, timeout=60).status_code)
            except requests.RequestException as err:
                count(type(err).__name__)
            count(classify(s, base, ["rocket.jpg"], model="no-such-model"))
            count(classify(s, base, ["rocket.jpg"], headers={}))
            count(classify(s, base, ["rocket.jpg"], timeout="1ms"))
            if tick % 5 == 1:
                burst(pool)
            tick += 1
            time.sleep(0.8)
    for w in workers:
        w.join(60)
    return statuses


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """visionserve + Prometheus, after the traffic has been scraped and the rules evaluated."""
    t0 = time.monotonic()
    server = start_server(["--api-key", API_KEY, "--max-queue-images", str(MAX_QUEUE_IMAGES),
                           "--max-images-per-request", str(MAX_QUEUE_IMAGES)])
    proc = None
    try:
        tmp = tmp_path_factory.mktemp("prometheus")
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(server.http), sort_keys=False))
        port = free_port()
        log = tmp / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([tool("prometheus"), f"--config.file={config}",
                                     f"--storage.tsdb.path={tmp / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{port}",
                                     "--storage.tsdb.retention.time=1h"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        prom = Prometheus(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
        prom.timings["visionserve start"] = time.monotonic() - t0
        wait_for("prometheus to be ready", lambda: requests.get(f"{prom.url}/-/ready", timeout=2).ok, 30, prom)
        wait_for("the first scrape of visionserve", lambda: prom.scalar(f'up{{job="{JOB}"}}') == 1, 30, prom)
        t1 = time.monotonic()
        prom.timings["prometheus start and first scrape"] = t1 - t0 - prom.timings["visionserve start"]
        prom.statuses = drive_traffic(f"http://{server.http}", TRAFFIC_S)
        ended = time.time()
        t2 = time.monotonic()
        prom.timings["traffic"] = t2 - t1

        def scraped_and_evaluated():
            # A scrape that started after the last answer, and a rule evaluation after that.
            scraped = prom.scalar(f'max(timestamp(up{{job="{JOB}"}}))') or 0
            groups = prom.api("rules")["data"]["groups"]
            evaluated = all(g.get("lastEvaluation", "").startswith(("19", "20"))
                            and _rfc3339(g["lastEvaluation"]) > scraped for g in groups)
            return scraped > ended and groups and evaluated
        wait_for("a scrape and a rule evaluation after the traffic", scraped_and_evaluated, 20, prom)
        prom.timings["last scrape and evaluation"] = time.monotonic() - t2
        yield prom
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        stop_server(server)


def _rfc3339(stamp: str) -> float:
    """Prometheus's `2024-05-01T12:00:00.123456789Z` (or with an offset) as Unix seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    assert m, stamp
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + float(m.group(2) or 0)


# ------------------------------------------------------------------------------------------
# Live checks
# ------------------------------------------------------------------------------------------

def data_problems(prom: Prometheus, e: Expr) -> list:
    """Why `e` fails the live check ([] when it passes)."""
    problems = []

    def evaluate(q, need_data) -> bool:
        body = prom.query(q)
        if body.get("status") != "success":
            problems.append(f"{e.where}: error {body.get('errorType')}: {body.get('error')}\n    {q}")
            return False
        data = body["data"]
        result = [{"value": data["result"]}] if data["resultType"] == "scalar" else data["result"]
        if need_data and not result:
            problems.append(f"{e.where}: no data\n    {q}")
        elif need_data and not any(math.isfinite(float(s["value"][1])) for s in result):
            problems.append(f"{e.where}: only NaN/Inf ({result[:3]})\n    {q}")
        return True

    if not evaluate(e.query, need_data=not (e.gpu or e.alert)):
        return problems  # it does not even parse
    if e.alert:
        evaluate(with_bool_comparisons(e.query), need_data=True)
    for selector in [] if e.gpu else selectors(e.query):
        body = prom.query(f"count({selector})")
        if body.get("status") != "success" or not body["data"]["result"]:
            problems.append(f"{e.where}: selector matches no series: {selector}")
    return problems


def test_traffic_reached_visionserve_and_prometheus(stack):
    statuses = stack.statuses
    print("set-up:", {k: round(v, 1) for k, v in stack.timings.items()}, "answers:", dict(statuses))
    for code, why in [(200, "classified"), (401, "no API key"), (404, "unknown model"),
                      (415, "not an image"), (429, "queue full"), (504, "1 ms deadline")]:
        assert statuses[code] > 0, f"no {code} ({why}) in the traffic: {dict(statuses)}"
    # Few on a busy 2-core machine (a classification can take a second there); enough for rates.
    assert statuses[200] >= 10, dict(statuses)
    assert set(statuses) <= {200, 401, 404, 415, 429, 504}, dict(statuses)
    (target,) = [t for t in stack.api("targets")["data"]["activeTargets"] if t["labels"]["job"] == JOB]
    assert target["health"] == "up", target
    # Prometheus saw every request the test made (unauthorized ones are counted apart).
    answered = sum(n for code, n in statuses.items() if code != 401)
    assert stack.scalar(f'sum(visionserve_requests_total{{job="{JOB}"}})') == answered
    assert stack.scalar(f'sum(visionserve_unauthorized_requests_total{{job="{JOB}"}})') == statuses[401]


def test_prometheus_loaded_and_evaluated_every_rule(stack):
    shipped = {rule.get("alert") or rule.get("record") for rule in load_rules()}
    loaded = {}
    for group in stack.api("rules")["data"]["groups"]:
        for rule in group["rules"]:
            loaded[rule["name"]] = rule
    assert set(loaded) == shipped
    bad = {name: (r.get("health"), r.get("lastError")) for name, r in loaded.items()
           if r.get("health") != "ok" or r.get("lastError")}
    assert bad == {}, bad


def test_every_dashboard_expression_returns_data(stack):
    exprs = list(dashboard_expressions(load_dashboard()))
    problems = [p for e in exprs for p in data_problems(stack, e)]
    assert not problems, f"{len(problems)} problem(s) in {len(exprs)} dashboard expressions:\n" + "\n".join(problems)
    assert any(e.gpu for e in exprs), f"no panel in the {GPU_ROW!r} row"


def test_every_alert_expression_evaluates_with_data(stack):
    exprs = list(alert_expressions())
    problems = [p for e in exprs for p in data_problems(stack, e)]
    assert not problems, f"{len(problems)} problem(s) in {len(exprs)} rule expressions:\n" + "\n".join(problems)


def test_the_live_checks_catch_mistakes(stack):
    """The checks above fail on a mistyped metric, a mistyped label value hidden by `or`, a
    syntax error and an alert whose signal has no data."""
    good = 'sum by (model) (rate(visionserve_requests_total{outcome="success"}[1m]))'
    assert data_problems(stack, Expr("good", good, good)) == []
    cases = {
        "metric": good.replace("requests_total", "request_total"),
        "label": ('(sum by (model) (rate(visionserve_requests_total{outcome="sucess"}[1m])) '
                  'or sum by (model) (rate(visionserve_requests_total[1m])) * 0)'),
        "syntax": good.replace("[1m]", "[1m"),
    }
    for what, expr in cases.items():
        assert data_problems(stack, Expr(what, expr, expr)), f"the {what} mistake went unnoticed: {expr}"
    silent_alert = "rate(visionserve_request_totl[5m]) > 0.05"
    assert data_problems(stack, Expr("alert", silent_alert, silent_alert, alert=True))
    # The GPU exemption still demands that the expression evaluates.
    broken_gpu = "visionserve_gpu_utilization_ratio{"
    assert data_problems(stack, Expr("gpu", broken_gpu, broken_gpu, gpu=True))
