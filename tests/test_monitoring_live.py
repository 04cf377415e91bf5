"""A real Prometheus (Debian's binary) scrapes a running gateway and inference worker on the default model after a
few requests; then every query on the serving dashboard returns data, and the alert rules evaluate against it.

The Prometheus config is monitoring/prometheus.yml itself with its jobs pointed at this suite's ports and a 1 s
scrape interval, so job names and rule files are the ones deployed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shared.redis_server import free_port
from shared.settings import DEFAULT_MODEL_ID
from tests.suite import running_suite, stop, wait_http
from tests.test_monitoring_assets import DASHBOARD_DIR, MONITORING, PanelQuery, panel_queries

MODEL = DEFAULT_MODEL_ID
# Its own Redis database of the session's server: streams and heartbeats of other test files cannot leak in.
LIVE_TEST_DB = 5
# Long enough to hold every request made below, short enough that rates are not diluted to nothing.
RATE_INTERVAL = "1m"
DATA_TIMEOUT_S = 45.0


def _prometheus_config(gateway: str, worker: str) -> dict:
    """monitoring/prometheus.yml, scraping this suite's gateway and worker every second instead of compose's DNS."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config.get("rule_files", [])]
    targets = {"gateway": gateway, "inference-workers": worker}
    config["scrape_configs"] = [
        {"job_name": job["job_name"], "static_configs": [{"targets": [targets[job["job_name"]]]}]}
        for job in config["scrape_configs"]
        if job["job_name"] in targets
    ]
    assert len(config["scrape_configs"]) == len(targets), "monitoring/prometheus.yml lost the gateway or worker job"
    return config


def _start_prometheus(config: dict, workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (run monitoring/install-tools.sh: Debian's prometheus package)")
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()  # the whole answer, streamed or not
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _wait_scraped(prometheus: str, jobs: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = {s["metric"]["job"] for s in _query(prometheus, "up == 1")}
        if jobs <= up:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape {sorted(jobs)} within {timeout} s")


def _make_traffic(base_url: str) -> None:
    """Successful requests (JSON and streamed), then refused ones, spread over a few scrapes so counters rise."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    for _ in range(2):
        assert _post(f"{base_url}/v1/chat/completions", chat) == 200
        assert _post(f"{base_url}/v1/chat/completions", dict(chat, stream=True)) == 200
        assert _post(f"{base_url}/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 6}) == 200
        assert _post(f"{base_url}/v1/chat/completions", dict(chat, max_tokens=-1)) == 400
        assert _post(f"{base_url}/v1/chat/completions", dict(chat, model="no-such-model")) == 404
        time.sleep(1.5)


@pytest.fixture(scope="module")
def prometheus(redis_url: str, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Prometheus that has scraped the suite through a few requests."""
    logs = tmp_path_factory.mktemp("monitoring-live")
    worker_port = free_port()
    url = f"{redis_url.rsplit('/', 1)[0]}/{LIVE_TEST_DB}"
    with running_suite(
        url, default_model_dir.parent, MODEL, logs, TRELLIS_WORKER_METRICS_PORT=str(worker_port)
    ) as base:
        gateway = base.removeprefix("http://")
        proc, prometheus_url = _start_prometheus(_prometheus_config(gateway, f"127.0.0.1:{worker_port}"), logs)
        try:
            wait_http(f"{prometheus_url}/-/ready", [proc], timeout=60)
            _wait_scraped(prometheus_url, {"gateway", "inference-workers"})
            _make_traffic(base)
            time.sleep(2)  # two more scrapes: the last requests' counters are in
            yield prometheus_url
        finally:
            stop([proc])


def _has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_serving_dashboard_query_returns_data(prometheus: str) -> None:
    queries = panel_queries(DASHBOARD_DIR / "serving.json", rate_interval=RATE_INTERVAL)
    assert queries
    empty: list[PanelQuery] = queries
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while empty and time.monotonic() < deadline:
        empty = [q for q in empty if not _has_data(_query(prometheus, q.expr))]
        if empty:
            time.sleep(1)
    assert not empty, "serving panels with no data from a live suite:\n" + "\n".join(map(str, empty))


def test_scraped_traffic_shows_the_requests_that_were_made(prometheus: str) -> None:
    done = _query(prometheus, f'sum(trellis_request_success_total{{model="{MODEL}"}})')
    assert done and float(done[0]["value"][1]) >= 6  # 2 rounds x 3 successful generations
    refused = {s["metric"]["reason"] for s in _query(prometheus, "trellis_gateway_rejected_total")}
    assert {"invalid_request", "model_not_found"} <= refused
    generated = _query(prometheus, f'trellis_generation_tokens_total{{model="{MODEL}"}}')
    assert generated and float(generated[0]["value"][1]) > 0


def test_workers_report_the_memory_their_weights_and_cache_hold(prometheus: str) -> None:
    held = {s["metric"]["kind"]: float(s["value"][1]) for s in _query(prometheus, "trellis_gpu_memory_bytes")}
    assert held.keys() == {"weights", "kv_cache"}
    assert held["weights"] > 400e6  # SmolLM2-135M in fp32 on a CPU worker (tied head counted once)
    assert held["kv_cache"] > 0


def test_alert_rules_evaluate_on_live_metrics(prometheus: str) -> None:
    depth = _query(prometheus, "model:trellis_queue_depth:sum")
    assert [s["metric"]["model"] for s in depth] == [MODEL]
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as resp:
        groups = json.loads(resp.read())["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
