"""The monitoring files of docker/ agree with the server and with each other: every series the
Grafana dashboard and Prometheus read is one the server exports, and the names that tie
compose, nginx, Prometheus and Grafana together match."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from server.metrics import Metrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SERIES = re.compile(r"\bllama_serve_[a-z0-9_]+")


def exported_series() -> set[str]:
    """Every series name in /metrics, including families with no sample yet (a labelled
    counter such as requests_rejected_total has none until the first rejection)."""
    text = Metrics("tiny").render().decode()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return samples | families


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "llama-serve.json").read_text())


def test_dashboard_reads_only_exported_series() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in SERIES.findall(expr)}
    assert used, exprs
    assert used <= exported_series(), used - exported_series()
    for quantile in ("time_to_first_token", "inter_token_latency"):
        assert any(f"histogram_quantile(0.99, sum by (le) (rate(llama_serve_{quantile}_seconds"
                   "_bucket" in e for e in exprs), quantile


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" /
                                  "prometheus.yaml").read_text())["datasources"]
    uids = {d["uid"] for d in provisioned}
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} <= uids, panel["title"]


def test_names_agree_across_compose_nginx_prometheus() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["llama"]["deploy"]["replicas"] == "${LLAMA_SERVE_REPLICAS:-2}"
    assert services["nginx"]["depends_on"]["llama"]["condition"] == "service_healthy"
    assert set(services["prometheus"]["profiles"]) == {"monitoring"}
    assert set(services["grafana"]["profiles"]) == {"monitoring"}
    assert re.search(r"^\s*server llama:8000 ", (DOCKER / "nginx.conf").read_text(), re.M)
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["llama"] and sd["port"] == 8000 and sd["type"] == "A"
    up = [t["expr"] for p in dashboard()["panels"] for t in p["targets"] if "up{" in t["expr"]]
    assert up and all(f'job="{job["job_name"]}"' in e for e in up)
    grafana_mounts = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" /
                               "llama-serve.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] in grafana_mounts
