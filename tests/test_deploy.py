"""The Kubernetes manifests under deploy/kubernetes, offline and fast.

Every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown or
misspelt field is an error), as written and as each kustomization renders it (a small renderer below covers
the kustomize features the manifests use; `kubectl kustomize` cross-checks it where kubectl is installed).
Then the properties that keep a deployment working: probes speak gRPC health on the server's port, pods run
as the image's non-root user with a read-only root, Services and the PodDisruptionBudget select the pods,
the HPA targets the Deployment, the config file holds only real knobs of server/config.py, every Secret the
pods read has a placeholder template, and the TLS overlay's exec probe really checks health over TLS.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from dataclasses import fields
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from twostage.server.config import ENV_PREFIX, Config
from twostage.server.metrics import Metrics
from twostage.v1 import twostage_pb2

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE, TLS, EMBEDDED = KUBE / "base", KUBE / "overlays" / "tls", KUBE / "embedded"
KUSTOMIZATIONS = {"base": BASE, "tls": TLS, "embedded": EMBEDDED}
SECRETS_TEMPLATE = KUBE / "secrets.example.yaml"
EXAMPLES = [SECRETS_TEMPLATE, KUBE / "hpa-inflight.example.yaml"]
# 1.30: the oldest release the manifests support (the preStop `sleep` action is on by default from 1.30);
# plus the newest release this kubernetes-validate ships, to catch fields removed since.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
SERVICE_NAME = twostage_pb2.DESCRIPTOR.services_by_name["TwoStage"].full_name
KNOBS = {f.name for f in fields(Config)}
# Knobs of the Milvus backend (issue 14), added to server/config.py by its own change. Until that lands
# they are the only keys allowed that are not knobs yet; once any milvus_* knob exists, all must.
MILVUS_KNOBS = {"milvus_uri", "milvus_collection", "milvus_token"}
PENDING_KNOBS = set() if any(k.startswith("milvus_") for k in KNOBS) else MILVUS_KNOBS
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "patches"}


# ------------------------------------------------------------------------------ loading, rendering


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def is_object(doc: object) -> bool:
    return isinstance(doc, dict) and "kind" in doc and not str(doc.get("apiVersion", "")).startswith(
        "kustomize.config.k8s.io")


def apply_json_patch(target: dict, operations: list[dict]) -> None:
    """RFC 6902 add / replace on `target`, in place (what the overlays use; anything else is refused)."""
    for operation in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        node = target
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = copy.deepcopy(operation["value"])
        if operation["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), value)
            else:
                node[last] = value
        elif operation["op"] == "replace":
            key = int(last) if isinstance(node, list) else last
            node[key]  # replace needs an existing member: a KeyError here is a patch that missed
            node[key] = value
        else:
            raise AssertionError(f"{operation['path']}: unsupported op {operation['op']!r}")


def render(directory: Path) -> list[dict]:
    """The objects a kustomization produces (generated ConfigMaps keep their plain names, no hash)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= KUSTOMIZATION_KEYS, f"{directory}: the renderer does not know {set(spec) - KUSTOMIZATION_KEYS}"
    objects: list[dict] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else [d for d in load_yaml(path) if is_object(d)]
    for generator in spec.get("configMapGenerator", []):
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": generator["name"],
                                     "labels": generator.get("options", {}).get("labels", {})},
                        "data": {Path(f).name: (directory / f).read_text() for f in generator["files"]}})
    for patch in spec.get("patches", []):
        target = patch["target"]
        matches = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, f"{directory}: patch target {target} matches {len(matches)} objects"
        apply_json_patch(matches[0], yaml.safe_load((directory / patch["path"]).read_text()))
    if "namespace" in spec:
        for o in objects:
            o["metadata"]["namespace"] = spec["namespace"]
    return objects


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(objects: list[dict]) -> dict:
    found = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1
    return found[0]


def server_container(objects: list[dict]) -> dict:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["twostage"]
    return containers[0]


def config_file(objects: list[dict]) -> tuple[str, dict]:
    """The TOML file the server is started with: --config PATH, found in the ConfigMap mounted there."""
    pod = workload(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    args = container["args"]
    path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = next(o for o in objects if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"])
    text = configmap["data"][path.name]
    return text, tomllib.loads(text)


def quantity_bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * units.get(unit, 1)


def image_user() -> int:
    users = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert len(users) == 1
    return int(users[0])


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(KUSTOMIZATIONS[request.param])


# ------------------------------------------------------------------------------------ schemas


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml"))


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_every_file_is_objects_a_kustomization_or_a_referenced_patch(path):
    """No YAML file sits there unchecked: it is validated below, or it is kustomize's own input."""
    docs = load_yaml(path)
    if path.name == "kustomization.yaml":
        assert len(docs) == 1 and set(docs[0]) <= KUSTOMIZATION_KEYS
    elif all(isinstance(d, list) for d in docs):  # a JSON 6902 patch: some kustomization must use it
        users = [k for k in KUBE.rglob("kustomization.yaml")
                 if path.name in [p["path"] for p in yaml.safe_load(k.read_text()).get("patches", [])]
                 and k.parent == path.parent]
        assert users, f"{path} is a patch that no kustomization applies"
    else:
        assert docs and all(is_object(d) for d in docs), f"{path}: not Kubernetes objects"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [p for p in manifest_files() if any(is_object(d) for d in load_yaml(p))],
                         ids=lambda p: str(p.relative_to(KUBE)))
def test_manifest_validates_against_the_kubernetes_schemas(path, version):
    for doc in load_yaml(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_kustomizations_validate(rendered, version):
    name, objects = rendered
    assert objects, name
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_is_strict():
    """Guards the tests above: a misspelt field must fail, or 'validates' would mean nothing."""
    deployment = copy.deepcopy(workload(render(BASE)))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("directory", sorted(KUSTOMIZATIONS.values()), ids=lambda p: str(p.relative_to(KUBE)))
def test_kustomization_lists_every_manifest_of_its_directory(directory):
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    used = set(spec.get("resources", [])) | {p["path"] for p in spec.get("patches", [])} \
        | {f for g in spec.get("configMapGenerator", []) for f in g["files"]}
    present = {p.name for p in directory.iterdir() if p.name != "kustomization.yaml"}
    local = {u for u in used if "/" not in u}
    assert present == local, f"unreferenced: {present - local}, missing: {local - present}"
    for other in used - local:
        assert (directory / other / "kustomization.yaml").is_file(), other


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kubectl_kustomize_renders_what_the_renderer_renders(name):
    done = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d]
    ours = render(KUSTOMIZATIONS[name])

    def key(o: dict) -> tuple[str, str]:
        name_ = o["metadata"]["name"]
        return o["kind"], re.sub(r"-[a-z0-9]{10}$", "", name_) if o["kind"] == "ConfigMap" else name_

    assert sorted(map(key, theirs)) == sorted(map(key, ours))
    for obj in theirs:
        kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
        if obj["kind"] in ("Deployment", "StatefulSet"):
            mine = next(o for o in ours if key(o) == key(obj))
            assert obj["spec"]["template"]["spec"]["containers"][0] == \
                mine["spec"]["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------- pods and probes


@pytest.mark.parametrize("directory", [BASE, EMBEDDED], ids=lambda p: p.name)
def test_probes_speak_grpc_health_on_the_server_port(directory):
    """Kubernetes' own gRPC probes (the TLS overlay's exec probes are tested at the end)."""
    objects = render(directory)
    container = server_container(objects)
    _, config = config_file(objects)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert grpc_port == config["port"]
    for probe in PROBES:
        assert set(container[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}, probe
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    # Ready only while the TwoStage service serves (loading, draining and backend loss flip it);
    # startup and liveness ask for the overall status.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == ""
    assert container["livenessProbe"]["grpc"]["service"] == ""


def test_startup_probe_outlasts_loading(rendered):
    """The startup window covers the Dockerfile's start period; for the embedded backend it also covers
    rebuilding the 1M-document HNSW graph from the store (a torn snapshot), as measured by bench.search."""
    name, objects = rendered
    probe = server_container(objects)["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    start_period = int(re.search(r"--start-period=(\d+)s", (ROOT / "Dockerfile").read_text()).group(1))
    assert window >= start_period
    if name == "embedded":
        import json
        search = json.loads((ROOT / "bench" / "results" / "search.json").read_text())
        build_s = search["synthetic"]["contenders"]["usearch-f32"]["build"]["build_s"]
        assert window >= build_s


def test_pods_run_as_the_image_user_non_root_read_only(rendered):
    _, objects = rendered
    pod = workload(objects)["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image_user() != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    container = server_container(objects)["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # With service links on, the Service "twostage" would inject TWOSTAGE_PORT=tcp://..., which the server
    # reads as its `port` knob and refuses to start.
    assert pod["enableServiceLinks"] is False
    assert "TWOSTAGE_PORT".removeprefix(ENV_PREFIX).lower() in KNOBS
    # A read-only root needs writable scratch space where the server and Python write.
    mounts = {m["mountPath"] for m in server_container(objects)["volumeMounts"]}
    assert {"/tmp", "/data"} <= mounts


def test_resources_are_guaranteed_and_match_the_inference_workers(rendered):
    """Requests equal limits (Guaranteed QoS), whole CPUs, and one inference worker per CPU."""
    _, objects = rendered
    resources = server_container(objects)["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    _, config = config_file(objects)
    assert config["inference_workers"] == int(resources["limits"]["cpu"])
    assert config["intra_op_threads"] == 1


def test_memory_limits_cover_the_measured_figures():
    """bench/results/memory.json: the server's peak RSS with an empty index (what a Milvus-backed replica
    holds) fits the base limit twice over; the embedded pod fits 1M f32 documents with 25 % to spare."""
    import json
    memory = json.loads((ROOT / "bench" / "results" / "memory.json").read_text())
    base = quantity_bytes(server_container(render(BASE))["resources"]["limits"]["memory"])
    assert base >= 2 * memory["server"]["empty_index"]["peak_rss"]
    embedded_objects = render(EMBEDDED)
    embedded = quantity_bytes(server_container(embedded_objects)["resources"]["limits"]["memory"])
    _, config = config_file(embedded_objects)
    assert embedded >= 1.25 * memory["estimate_at_n"]["dtypes"][config["index_dtype"]]["server_rss_bytes"]
    claim = workload(embedded_objects)["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
    per_document = memory["server"]["with_documents"]["index_directory_bytes"] / \
        memory["server"]["with_documents"]["documents"]
    assert quantity_bytes(claim["storage"]) >= 2 * per_document * memory["estimate_at_n"]["n"]


def test_metrics_port_is_exposed_and_annotated_for_prometheus(rendered):
    _, objects = rendered
    template = workload(objects)["spec"]["template"]
    _, config = config_file(objects)
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports["metrics"] == config["metrics_port"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config["metrics_port"]
    assert annotations["prometheus.io/path"] == "/metrics"


# ------------------------------------------------------------------- services, PDB, autoscaler


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_services_select_the_pods_on_named_ports(rendered):
    name, objects = rendered
    template = workload(objects)["spec"]["template"]
    ports = {p["name"] for p in server_container(objects)["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert selects(service["spec"]["selector"], template["metadata"]["labels"]), service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    assert [p["port"] for p in headless[0]["spec"]["ports"]] == [config_file(objects)[1]["port"]]
    assert not headless[0]["spec"].get("publishNotReadyAddresses", False)
    if name != "embedded":
        assert headless[0]["metadata"]["name"] == "twostage-headless"  # the dns:/// name in docs/deploy.md
        assert workload(objects)["spec"]["selector"]["matchLabels"] == headless[0]["spec"]["selector"]


def test_base_and_embedded_never_select_each_others_pods():
    base, embedded = render(BASE), render(EMBEDDED)
    for mine, other in ((base, embedded), (embedded, base)):
        labels = workload(other)["spec"]["template"]["metadata"]["labels"]
        for obj in mine:
            selector = obj.get("spec", {}).get("selector")
            if obj["kind"] == "Service":
                assert not selects(selector, labels), obj["metadata"]["name"]
            elif selector:
                assert not selects(selector["matchLabels"], labels), obj["metadata"]["name"]


def test_disruption_budget_and_autoscaler_fit_the_deployment():
    objects = render(BASE)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        ("apps/v1", "Deployment", deployment["metadata"]["name"])
    # The HPA owns the replica count: a `replicas` in the Deployment would be reset by every apply.
    assert "replicas" not in deployment["spec"]
    # One replica may be disrupted while another still serves.
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["maxUnavailable"] + 1
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # Rolling updates never drop below the current count (maxUnavailable 0).
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_inflight_autoscaler_example_uses_a_metric_the_server_exports():
    hpa = one(load_yaml(KUBE / "hpa-inflight.example.yaml"), "HorizontalPodAutoscaler")
    deployment = one(render(BASE), "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    exported = {metric.name for metric in Metrics().registry.collect()}
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported


# ------------------------------------------------------------------- config file and secrets


def test_config_file_holds_only_knobs_of_server_config(rendered, tmp_path):
    _, objects = rendered
    text, config = config_file(objects)
    assert all(not isinstance(v, dict) for v in config.values()), "flat keys only"
    unknown = set(config) - KNOBS - PENDING_KNOBS
    assert not unknown, f"not knobs of server/config.py: {sorted(unknown)}"
    # Everything that is a knob today loads through the server's own loader (types, choices, limits).
    loadable = tmp_path / "twostage.toml"
    loadable.write_text("\n".join(line for line in text.splitlines()
                                  if line.split("=")[0].strip() not in PENDING_KNOBS))
    loaded = Config.from_sources(config_file=str(loadable), env={})
    for key, value in config.items():
        if key not in PENDING_KNOBS:
            assert getattr(loaded, key) == value, key
    assert loaded.host == "0.0.0.0" and loaded.models == "/models"


def test_environment_variables_are_knobs(rendered):
    _, objects = rendered
    names = [e["name"] for e in server_container(objects).get("env", [])]
    assert names and all(n.startswith(ENV_PREFIX) for n in names)
    unknown = {n.removeprefix(ENV_PREFIX).lower() for n in names} - KNOBS - PENDING_KNOBS
    assert not unknown, unknown


def test_base_selects_the_milvus_backend():
    objects = render(BASE)
    _, config = config_file(objects)
    assert config["milvus_uri"].startswith("http://") and config["milvus_uri"].endswith(".svc.cluster.local:19530")
    assert config["milvus_collection"]
    assert "index" not in config  # the embedded backend's directory has no place in a stateless replica
    token = next(e for e in server_container(objects)["env"] if e["name"] == ENV_PREFIX + "MILVUS_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "twostage-milvus"


@pytest.mark.skipif(bool(PENDING_KNOBS), reason="the Milvus backend's knobs are not in server/config.py yet")
def test_base_config_loads_with_the_milvus_knobs(tmp_path):
    text, config = config_file(render(BASE))
    path = tmp_path / "twostage.toml"
    path.write_text(text)
    loaded = Config.from_sources(config_file=str(path), env={ENV_PREFIX + "MILVUS_TOKEN": "user:secret"})
    assert (loaded.milvus_uri, loaded.milvus_collection) == (config["milvus_uri"], config["milvus_collection"])
    assert loaded.milvus_token == "user:secret"


def secret_references(objects: list[dict]) -> set[tuple[str, str | None]]:
    """(secret, key) for every secretKeyRef; (secret, None) for every Secret volume."""
    pod = workload(objects)["spec"]["template"]["spec"]
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in pod["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    return refs | {(v["secret"]["secretName"], None) for v in pod.get("volumes", []) if "secret" in v}


def test_every_secret_the_pods_read_has_a_placeholder_template(rendered):
    _, objects = rendered
    templates = {s["metadata"]["name"]: s for s in load_yaml(SECRETS_TEMPLATE)}
    refs = secret_references(objects)
    assert refs
    for name, key in refs:
        assert name in templates, name
        if key is not None:
            assert key in templates[name]["stringData"], (name, key)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by hand, never by apply -k"


def test_secret_templates_hold_placeholders_only():
    for secret in load_yaml(SECRETS_TEMPLATE):
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, (secret["metadata"]["name"], key)
    tls = next(s for s in load_yaml(SECRETS_TEMPLATE) if s["metadata"]["name"] == "twostage-tls")
    assert tls["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key", "ca.crt"} == set(tls["stringData"])


# --------------------------------------------------------------------------------- TLS overlay


def test_tls_overlay_turns_tls_on_from_the_mounted_secret():
    objects = render(TLS)
    container = server_container(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in workload(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "twostage-tls" and mount["readOnly"] is True
    for knob, key in (("TLS_CERT", "tls.crt"), ("TLS_KEY", "tls.key")):
        assert env[ENV_PREFIX + knob] == f"{mount['mountPath']}/{key}"
    for probe in PROBES:
        assert "grpc" not in container[probe] and container[probe]["exec"]["command"][:2] == ["python", "-c"]
        assert f"{mount['mountPath']}/ca.crt" in container[probe]["exec"]["command"][2]
    services = {p: container[p]["exec"]["command"][3] for p in PROBES}
    assert services == {"startupProbe": "", "readinessProbe": SERVICE_NAME, "livenessProbe": ""}
    # Everything else is the base's.
    base = server_container(render(BASE))
    assert {k: v for k, v in container.items() if k not in (*PROBES, "env", "volumeMounts")} == \
        {k: v for k, v in base.items() if k not in (*PROBES, "env", "volumeMounts")}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory) -> Path:
    """A CA and a server certificate for the name the probes verify ("twostage")."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=deploy test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=twostage", cwd=d)
    (d / "ext").write_text("subjectAltName=DNS:twostage\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-out", "tls.crt", "-extfile", "ext", cwd=d)
    return d


def test_tls_exec_probe_checks_health_over_tls(server_certificate):
    """The overlay's probe command, run as the kubelet would (paths and port mapped to this machine)
    against a TLS gRPC health server: exit 0 only while the asked service is SERVING."""
    container = server_container(render(TLS))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
    _, config = config_file(render(TLS))
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([((server_certificate / "tls.key").read_bytes(),
                                          (server_certificate / "tls.crt").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()

    def probe(name: str) -> int:
        python, flag, code, service = container[name]["exec"]["command"]
        code = code.replace(mount, str(server_certificate)).replace(f":{config['port']}", f":{port}")
        return subprocess.run([sys.executable, flag, code, service], capture_output=True, timeout=30).returncode

    try:
        for name in ("", SERVICE_NAME):
            servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe("readinessProbe") == 1 and probe("livenessProbe") == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe("livenessProbe") == 0 and probe("startupProbe") == 0
        assert probe("readinessProbe") == 1  # the TwoStage service is still NOT_SERVING
        servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        assert probe("readinessProbe") == 0
    finally:
        server.stop(None)


# ------------------------------------------------------------------------------ Milvus values


def test_milvus_values_turn_authentication_on_and_serve_the_configured_uri():
    """deploy/milvus/values.yaml is input to Milvus's own chart (not vendored): it must at least parse,
    run in cluster mode with authentication on (twostage sends a token), and the release it documents must
    be the host in the base's milvus_uri."""
    path = ROOT / "deploy" / "milvus" / "values.yaml"
    values = yaml.safe_load(path.read_text())
    assert values["cluster"]["enabled"] is True
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True
    release, namespace = re.search(r"helm install (\S+) zilliztech/milvus --namespace (\S+)", path.read_text()).groups()
    _, config = config_file(render(BASE))
    assert config["milvus_uri"] == f"http://{release}.{namespace}.svc.cluster.local:19530"
