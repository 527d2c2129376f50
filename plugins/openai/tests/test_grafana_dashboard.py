"""The Grafana dashboard shipped in deploy/grafana reads only series that a live server's
/metrics has, with the label names its queries select on; the Prometheus scrape examples
point at /metrics, and compose.yaml mounts them and the dashboard where Prometheus and
Grafana read them. (Running compose needs a container engine; tests/test_container.py runs
the image where one is.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from openai_live import MODEL
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
METRIC = re.compile(r"\bflowserve:[a-z0-9_:]+")
LABEL = re.compile(r"\b(?:by|without) \(([^)]*)\)|\{([^}]*)\}")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "flowserve.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def test_every_metric_the_dashboard_queries_is_on_a_live_servers_metrics(toy_server):
    client = toy_server.client()
    client.completions.create(model=MODEL, prompt="t3", max_tokens=3)  # so every request histogram has series
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t2"}], max_tokens=2)
    text = httpx.get(toy_server.url + "/metrics", timeout=10).text
    samples: dict[str, set[str]] = {}  # sample name → the label names its series carry
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)

    queries = dashboard_queries()
    named = {name for query in queries for name in METRIC.findall(query)}
    assert len(named) >= 15  # latency, throughput, queue, KV, instances, scaling
    missing = sorted(name for name in named if name not in samples)
    assert not missing, f"the dashboard queries series /metrics does not have: {missing}"
    for query in queries:  # every label a query groups or filters by is one its series carry
        labels = set()
        for grouped, selector in LABEL.findall(query):
            labels.update(part.strip() for part in grouped.split(",") if part.strip())
            labels.update(re.findall(r"(\w+)\s*[=!]~?", selector))
        for name in METRIC.findall(query):
            assert labels - {"le"} <= samples[name] | {"le"}, (query, labels - samples[name])
    assert "model_name" in samples["flowserve:num_requests_running"]


def test_the_prometheus_examples_scrape_metrics_and_compose_wires_them_to_the_dashboard():
    for name, target in (("prometheus.yml", "127.0.0.1:8000"), ("compose.yml", "flowserve:8000")):
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        (job,) = config["scrape_configs"]
        assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [target]

    compose = yaml.safe_load((DEPLOY.parent / "compose.yaml").read_text())["services"]
    assert compose["flowserve"]["build"] == "." and compose["flowserve"]["ports"] == ["127.0.0.1:8000:8000"]
    mounts = {target.split(":")[0]: source for volumes in (s.get("volumes", []) for s in compose.values())
              for source, target in (v.split(":", 1) for v in volumes)}
    for source in mounts.values():  # every file compose mounts is in the repository
        assert (DEPLOY.parent / source).exists(), source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/compose.yml"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "flowserve.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards] == "./deploy/grafana" and (DEPLOY / "grafana" / "flowserve.json").is_file()
    (source,) = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
                               .read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose
