"""The deploy files (Dockerfile, deploy/) agree with the program: ports, paths, command, configs, metric names.

Parsing only: nothing here builds an image or starts a container.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from hyperpool.cli import _parser
from hyperpool.config import (
    DEFAULT_LISTEN_PORT,
    DEFAULT_METRICS_PORT,
    HEALTH_PATH,
    METRICS_PATH,
    READY_PATH,
    Config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
DOCKERFILE = ROOT / "Dockerfile"
UNIT = DEPLOY / "systemd" / "hyperpool.service"
DASHBOARD = DEPLOY / "grafana" / "hyperpool-dashboard.json"

CONFIG_PATH = "/etc/hyperpool/hyperpool.yaml"  # where the README says the image reads its config
DOCUMENTED_COMMAND = ["hyperpool", "--config", CONFIG_PATH, "run"]
APP_LABELS = {"app.kubernetes.io/name": "hyperpool", "app.kubernetes.io/instance": "hyperpool"}
K8S_FILES = {
    "deployment.yaml": "Deployment", "service.yaml": "Service", "configmap.yaml": "ConfigMap",
    "secret.yaml": "Secret", "pdb.yaml": "PodDisruptionBudget", "hpa.yaml": "HorizontalPodAutoscaler",
    "servicemonitor.yaml": "ServiceMonitor",
}

# Mirrors the metrics hyperpool's HTTP endpoint exposes (hyperpool/metrics.py): exposed name -> (type, labels).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels.split()))
    for name, kind, labels in [
        ("hyperpool_clients", "gauge", "database user state"),
        ("hyperpool_servers", "gauge", "database user state"),
        ("hyperpool_pool_size", "gauge", "database user"),
        ("hyperpool_pool_max", "gauge", "database user"),
        ("hyperpool_pinned_clients", "gauge", "database reason"),
        ("hyperpool_transactions_total", "counter", "database"),
        ("hyperpool_queries_total", "counter", "database"),
        ("hyperpool_bytes_received_total", "counter", "database"),
        ("hyperpool_bytes_sent_total", "counter", "database"),
        ("hyperpool_server_connections_opened_total", "counter", "database"),
        ("hyperpool_server_connections_closed_total", "counter", "database reason"),
        ("hyperpool_auth_failures_total", "counter", "reason"),
        ("hyperpool_errors_total", "counter", "database sqlstate_class"),
        ("hyperpool_cache_requests_total", "counter", "database status"),
        ("hyperpool_cache_evictions_total", "counter", "database"),
        ("hyperpool_cache_invalidations_total", "counter", "database"),
        ("hyperpool_cache_stored_total", "counter", "database"),
        ("hyperpool_cache_too_big_total", "counter", "database"),
        ("hyperpool_cache_bytes", "gauge", "database"),
        ("hyperpool_cache_entries", "gauge", "database"),
        ("hyperpool_client_wait_seconds", "histogram", "database"),
        ("hyperpool_query_duration_seconds", "histogram", "database"),
    ]
}
# labels Prometheus adds to every scraped series (static_configs and ServiceMonitor targets)
TARGET_LABELS = frozenset({"job", "instance"})
# what the dashboard must show: TPS, QPS, clients and servers by state, wait time, query duration, errors by class,
# cache hit ratio, pinned clients by reason, connections opened/closed
DASHBOARD_REQUIRED = {
    "hyperpool_transactions_total", "hyperpool_queries_total", "hyperpool_clients", "hyperpool_servers",
    "hyperpool_client_wait_seconds", "hyperpool_query_duration_seconds", "hyperpool_errors_total",
    "hyperpool_cache_requests_total", "hyperpool_pinned_clients", "hyperpool_server_connections_opened_total",
    "hyperpool_server_connections_closed_total",
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --- readers --------------------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _k8s(kind: str) -> dict[str, Any]:
    file = next(name for name, k in K8S_FILES.items() if k == kind)
    (doc,) = _yaml_docs(K8S / file)
    assert doc["kind"] == kind
    return doc


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    (container,) = _pod_spec()["containers"]
    return container


def _configmap_text() -> str:
    text: str = _k8s("ConfigMap")["data"]["hyperpool.yaml"]
    return text


def _compose() -> dict[str, Any]:
    (doc,) = _yaml_docs(COMPOSE / "docker-compose.yaml")
    return doc


def _shipped_configs() -> dict[str, str]:
    """The config files deploy/ ships: name -> YAML text."""
    return {"configmap": _configmap_text(), "compose": (COMPOSE / "hyperpool.yaml").read_text(encoding="utf-8")}


def _load(text: str) -> Config:
    """Validate a shipped config the way hyperpool does, with a placeholder for every ${VAR} it names."""
    env = {name: f"placeholder-{name.lower()}" for name in _ENV_REF.findall(text)}
    return parse_config(yaml.safe_load(text), env, source="<deploy>")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends in a line continuation"
    return instructions


def _docker(keyword: str) -> list[str]:
    return [args for kw, args in _dockerfile() if kw == keyword]


def _last_stage(keyword: str) -> str:
    """The argument of the last such instruction (the runtime stage's)."""
    values = _docker(keyword)
    assert values, f"Dockerfile has no {keyword}"
    return values[-1]


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not the exec form: {text}"
    return value


def _image_command() -> list[str]:
    return _exec_form(_last_stage("ENTRYPOINT")) + _exec_form(_last_stage("CMD"))


def _unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd keys such as ExecReload may repeat, so no configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{UNIT.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT.name}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_value(section: str, key: str) -> str:
    (value,) = _unit()[section][key]
    return value


def _seconds(text: str | int) -> float:
    """A duration as compose and systemd write it: 45, "45", "45s", "1m30s"."""
    if isinstance(text, int):
        return float(text)
    if text.strip().isdigit():
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def _quantity(text: str | int) -> float:
    """A Kubernetes resource quantity: 500m, 1, 256Mi."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(text))
    assert match, f"unexpected quantity {text!r}"
    scale = {None: 1, "m": 0.001, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(match[1]) * scale[match[2]]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _metric(name: str) -> tuple[str, frozenset[str]]:
    """The base metric a series name belongs to and the labels the series may carry."""
    if name in METRICS:
        return name, METRICS[name][1]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in METRICS and METRICS[base][0] == "histogram":
            return base, METRICS[base][1] | ({"le"} if suffix == "_bucket" else set())
    raise AssertionError(f"the dashboard uses {name}, which hyperpool does not expose")


# --- every file parses ----------------------------------------------------------------------------------


def test_every_yaml_and_json_under_deploy_parses() -> None:
    yamls = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    jsons = sorted(DEPLOY.rglob("*.json"))
    names = {str(p.relative_to(DEPLOY)) for p in yamls + jsons}
    expected = {f"kubernetes/{name}" for name in K8S_FILES} | {
        "compose/docker-compose.yaml", "compose/hyperpool.yaml", "compose/prometheus.yml",
        "grafana/hyperpool-dashboard.json",
    }
    assert expected <= names
    for path in yamls:
        assert _yaml_docs(path), f"{path}: no YAML document"
    for path in jsons:
        with path.open(encoding="utf-8") as f:
            assert json.load(f), f"{path}: empty"
    for name, text in _shipped_configs().items():
        assert isinstance(yaml.safe_load(text), dict), name


def test_kubernetes_objects_are_named_and_labelled_consistently() -> None:
    for file, kind in K8S_FILES.items():
        (doc,) = _yaml_docs(K8S / file)
        assert doc["kind"] == kind, file
        assert "namespace" not in doc["metadata"], f"{file}: apply with -n instead"
        assert APP_LABELS.items() <= doc["metadata"]["labels"].items(), file
        assert doc["metadata"]["name"] == ("hyperpool-origin" if kind == "Secret" else "hyperpool"), file
    deployment = _k8s("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector == APP_LABELS and selector.items() <= pod_labels.items()
    assert _k8s("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    target = _k8s("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "hyperpool")
    monitor = _k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= _k8s("Service")["metadata"]["labels"].items()
    # the HPA owns the replica count
    assert "replicas" not in deployment["spec"]


# --- ports ----------------------------------------------------------------------------------------------


def test_ports_match_the_program_defaults_everywhere() -> None:
    listen, metrics = DEFAULT_LISTEN_PORT, DEFAULT_METRICS_PORT
    for name, text in _shipped_configs().items():
        config = _load(text)
        assert config.listen_port == listen, name
        assert config.listen_host == "0.0.0.0", f"{name}: must be reachable from outside the container"
        assert config.metrics is not None, f"{name}: metrics: must be set for probes and scraping"
        assert config.metrics.port == metrics, name
        assert config.metrics.host == "0.0.0.0", name

    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert container_ports == {"postgresql": listen, "metrics": metrics}
    service_ports = {p["name"]: p for p in _k8s("Service")["spec"]["ports"]}
    assert set(service_ports) == {"postgresql", "metrics"}
    for name, port in service_ports.items():
        assert port["port"] == container_ports[name]
        assert port["targetPort"] in (name, container_ports[name])
    (endpoint,) = _k8s("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"

    assert sorted(int(p.split("/")[0]) for p in _last_stage("EXPOSE").split()) == sorted([listen, metrics])

    published = set()
    for spec in _compose()["services"]["hyperpool"]["ports"]:
        host_side, _, container = str(spec).rpartition(":")
        assert host_side.split(":")[-1] == container, f"compose publishes {spec}: keep the same port number"
        published.add(int(container))
    assert published == {listen, metrics}

    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"hyperpool:{metrics}"]


# --- paths: probes, health check, scraping --------------------------------------------------------------


def test_probes_and_the_healthcheck_use_the_endpoint_paths() -> None:
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", READY_PATH), ("livenessProbe", HEALTH_PATH)):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == DEFAULT_METRICS_PORT, probe

    healthcheck = _last_stage("HEALTHCHECK")
    options, sep, command = healthcheck.partition("CMD ")
    assert sep and all(o.startswith("--") for o in options.split()), healthcheck
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"], "slim has no curl: use python"
    compile(argv[2], "<HEALTHCHECK>", "exec")  # the one-liner is valid Python
    (url,) = re.findall(r"urlopen\('([^']+)'", argv[2])
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "http", "127.0.0.1", DEFAULT_METRICS_PORT, HEALTH_PATH)


def test_prometheus_scrapes_the_metrics_path() -> None:
    (endpoint,) = _k8s("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["path"] == METRICS_PATH
    (job,) = yaml.safe_load((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))["scrape_configs"]
    assert job["metrics_path"] == METRICS_PATH


# --- the command -------------------------------------------------------------------------------------------


def test_the_image_runs_the_documented_command() -> None:
    assert _image_command() == DOCUMENTED_COMMAND
    args = _parser().parse_args(DOCUMENTED_COMMAND[1:])
    assert (args.command, args.config) == ("run", CONFIG_PATH)
    # the manifests keep the image's command
    assert not {"command", "args"} & set(_container())
    assert not {"command", "entrypoint"} & set(_compose()["services"]["hyperpool"])
    # and the image runs it as a non-root user: the one the Deployment expects
    user = _last_stage("USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0, "USER must be numeric and not root"
    security = _pod_spec()["securityContext"]
    assert security["runAsUser"] == int(user[0])
    assert _last_stage("STOPSIGNAL") == "SIGTERM"


def test_the_config_is_mounted_where_the_command_reads_it() -> None:
    path = PurePosixPath(CONFIG_PATH)
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == "config"]
    assert PurePosixPath(mount["mountPath"]) == path.parent and "subPath" not in mount
    (volume,) = [v for v in _pod_spec()["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert volume["configMap"]["items"] == [{"key": path.name, "path": path.name}]
    mounts = [str(v).split(":") for v in _compose()["services"]["hyperpool"]["volumes"]]
    assert ["./hyperpool.yaml", CONFIG_PATH, "ro"] in mounts


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {line.strip().lstrip("!").rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for args in _docker("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        if "--from=" in args:
            continue
        for source in words[:-1]:
            assert source in allowed, f".dockerignore leaves {source} out of the build context"
            assert (ROOT / source).exists(), source


# --- configs --------------------------------------------------------------------------------------------


def test_the_shipped_configs_load() -> None:
    for name, text in _shipped_configs().items():
        config = _load(text)
        assert config.databases, name
        assert config.admin_users, f"{name}: name an admin user for the console"
        assert config.shutdown_timeout > 0, f"{name}: 0 waits forever, which no grace period covers"
        assert all(db.pool.min_pool_size >= 1 for db in config.databases.values()), f"{name}: /readyz needs warm"
    # Kubernetes: SCRAM verifiers, never plain-text passwords
    assert all(user.plaintext is None for user in _load(_configmap_text()).users.values())


def test_every_config_variable_comes_from_the_environment_given() -> None:
    # Kubernetes: from the Secret, through env
    secret = _k8s("Secret")
    env = {e["name"]: e for e in _container()["env"]}
    for var in set(_ENV_REF.findall(_configmap_text())):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # the Secret is a template: every value is a marked placeholder
    assert all("REPLACE" in value for value in secret["stringData"].values())
    # compose: from the service's environment
    compose_env = _compose()["services"]["hyperpool"]["environment"]
    compose_config = (COMPOSE / "hyperpool.yaml").read_text(encoding="utf-8")
    assert set(_ENV_REF.findall(compose_config)) <= set(compose_env)


# --- stopping: the drain fits in the grace period -----------------------------------------------------------


def test_the_grace_periods_exceed_the_drain() -> None:
    shutdown_timeout = _load(_configmap_text()).shutdown_timeout
    pod = _pod_spec()
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = float(pre_stop[1])
    assert 0 < sleep < pod["terminationGracePeriodSeconds"]
    # the grace period runs from the start of preStop: it must cover the sleep and the whole drain
    assert pod["terminationGracePeriodSeconds"] > sleep + shutdown_timeout

    compose = _compose()["services"]["hyperpool"]
    assert _seconds(compose["stop_grace_period"]) > _load((COMPOSE / "hyperpool.yaml").read_text()).shutdown_timeout

    assert _seconds(_unit_value("Service", "TimeoutStopSec")) > Config().shutdown_timeout


# --- Kubernetes operation ------------------------------------------------------------------------------------


def test_the_pod_is_locked_down_and_sized() -> None:
    pod, container = _pod_spec(), _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        assert _quantity(resources["requests"][resource]) <= _quantity(resources["limits"][resource]), resource


def test_scaling_and_disruption_budget() -> None:
    hpa = _k8s("HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # a voluntary disruption always leaves a replica serving, and a drain can always proceed
    pdb = _k8s("PodDisruptionBudget")["spec"]
    (budget,) = {"maxUnavailable", "minAvailable"} & set(pdb)
    assert isinstance(pdb[budget], int) and 1 <= pdb[budget] < hpa["minReplicas"], budget
    # every replica opens up to pool_size connections per database: at the most replicas the origin must still
    # take them under PostgreSQL's default max_connections (100, 3 reserved for superusers)
    for db in _load(_configmap_text()).databases.values():
        assert hpa["maxReplicas"] * db.pool.pool_size <= 97, db.name


# --- systemd ---------------------------------------------------------------------------------------------


def test_the_systemd_unit_runs_the_documented_command() -> None:
    service = _unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/") and PurePosixPath(argv[0]).name == DOCUMENTED_COMMAND[0]
    assert argv[1:] == DOCUMENTED_COMMAND[1:]
    assert _parser().parse_args(argv[1:]).command == "run"
    reloads = [shlex.split(v) for v in service["ExecReload"]]
    assert reloads[-1] == ["/bin/kill", "-HUP", "$MAINPID"]
    for argv in reloads[:-1]:  # a validation before the signal, if any, must be a command hyperpool knows
        assert PurePosixPath(argv[0]).name == "hyperpool"
        assert _parser().parse_args(argv[1:]).command == "check-config"
    assert _unit_value("Service", "KillSignal") == "SIGTERM"
    assert _unit_value("Service", "Type") in ("exec", "simple")
    assert _unit_value("Service", "User") not in ("root", "0")
    assert _unit_value("Service", "NoNewPrivileges") == "yes"
    assert _unit_value("Install", "WantedBy") == "multi-user.target"


# --- Grafana -------------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_uses_only_exposed_metrics_and_labels() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for text in _strings(dashboard):
        for name in re.findall(r"\bhyperpool_[A-Za-z0-9_:]+", text):
            used.add(_metric(name)[0])
    missing = DASHBOARD_REQUIRED - used
    assert not missing, f"no panel for {sorted(missing)}"

    for expr in _exprs(dashboard):
        allowed = set(TARGET_LABELS)
        for name, matchers in re.findall(r"\b(hyperpool_\w+)\s*(?:\{([^}]*)\})?", expr):
            labels = _metric(name)[1] | TARGET_LABELS
            allowed |= labels
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", matchers):
                assert label in labels, f"{name} has no label {label}: {expr}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",") if g.strip()):
                assert label in allowed, f"no metric in the expression has {label}: {expr}"
        for label in re.findall(r"label_values\([^)]*,\s*(\w+)\)", expr):
            assert label in allowed, expr
        for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
            assert "_bucket" in inner and "le" in inner, f"histogram_quantile needs _bucket by le: {expr}"


def test_the_dashboard_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for text in _exprs(dashboard):
        for name in re.findall(r"\$(\w+)", text):
            assert name in variables or name.startswith("__"), f"undefined variable ${name}"



def test_readme_documents_the_image_command_and_config_path() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"`{' '.join(DOCUMENTED_COMMAND)}`" in readme
    assert f"`{CONFIG_PATH}`" in readme
