"""The container deployment (infra/docker-compose.yml, Prometheus, Grafana) agrees with the code:
every command exists, every stage runs, scales and is scraped, and every charted metric exists."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from backbone.cli import build_parser
from backbone.settings import Settings
from backbone.stages import PIPELINE, STAGES

import yaml  # noqa: E402  (a test dependency: a missing one must fail, not skip)

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DASHBOARDS = INFRA / "grafana" / "dashboards"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = load_yaml(COMPOSE)["services"]
    return loaded


def runs_avatar(service: dict[str, Any]) -> bool:
    """Services on the project image, whose entrypoint is `avatar`."""
    return "build" in service or str(service.get("image", "")).startswith("avatar-backbone")


def avatar_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if runs_avatar(s)}


def stage_services(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """service name -> stage name, for every service running `avatar stage NAME`."""
    return {name: s["command"][1] for name, s in avatar_services(services).items()
            if s["command"][0] == "stage"}


def host_port(spec: str | int | dict[str, Any]) -> bool:
    if isinstance(spec, dict):
        return "published" in spec
    return ":" in str(spec)  # "8080:80" or "127.0.0.1:8080:80"; a bare "80" publishes nothing


def test_every_avatar_command_parses_with_the_cli(services: dict[str, dict[str, Any]]) -> None:
    assert avatar_services(services), "no service runs the avatar image"
    for name, service in avatar_services(services).items():
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        try:
            args = build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"service {name}: `avatar {' '.join(command)}` is not a valid command")
        if args.command == "stage":
            assert args.name in STAGES, f"service {name}: unknown stage {args.name!r}"


def test_every_pipeline_stage_has_a_service(services: dict[str, dict[str, Any]]) -> None:
    assert sorted(stage_services(services).values()) == sorted(PIPELINE)


def test_stages_start_after_topics_which_start_after_a_healthy_broker(
        services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.0.1"
    assert "/opt/kafka/bin/" in " ".join(kafka["healthcheck"]["test"])
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in stage_services(services):
        condition = services[name]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully", name


def test_stages_can_scale_out(services: dict[str, dict[str, Any]]) -> None:
    for name in stage_services(services):
        service = services[name]
        assert "container_name" not in service, f"{name}: container_name prevents --scale"
        published = [p for p in service.get("ports", []) if host_port(p)]
        assert not published, f"{name}: a host port prevents --scale: {published}"


def test_stages_use_kafka_and_serve_metrics_to_other_containers(
        services: dict[str, dict[str, Any]]) -> None:
    for name in stage_services(services):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        assert env["AVATAR_BUS"] == "kafka", name
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["AVATAR_METRICS_PORT"] == "9100", name
        assert env["AVATAR_METRICS_ADDR"] == "0.0.0.0", name


def test_metrics_address_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_addr == "127.0.0.1"
    monkeypatch.setenv("AVATAR_METRICS_ADDR", "0.0.0.0")
    assert Settings.from_env().metrics_addr == "0.0.0.0"


def test_prometheus_scrapes_every_stage_service(services: dict[str, dict[str, Any]]) -> None:
    mounts = services["prometheus"]["volumes"]
    assert any(str(m).startswith("./prometheus/prometheus.yml:") for m in mounts)
    config = load_yaml(INFRA / "prometheus" / "prometheus.yml")
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type") == "A", job["job_name"]
            for dns_name in sd["names"]:
                scraped[dns_name] = int(sd["port"])
    for name in stage_services(services):
        assert scraped.get(name) == 9100, f"prometheus does not scrape {name}:9100"


def test_grafana_provisions_the_datasource_and_dashboards_the_compose_file_mounts(
        services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(str(m).split(":")[:2] for m in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(INFRA / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")
    assert [p["options"]["path"] for p in providers["providers"]] == [
        mounts["./grafana/dashboards"]]
    sources = load_yaml(INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {s["uid"] for s in sources["datasources"]}
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] in uids, f"{path.name}: {panel['title']}"


def exposed_metric_names() -> set[str]:
    """Every sample name the registry can expose, including for metrics with no sample yet."""
    import backbone.metrics  # noqa: F401  (registers the stage metrics)
    import processors.render  # noqa: F401  (registers the render metrics)
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query", "")
        queries.append(query["query"] if isinstance(query, dict) else str(query))
    return queries


def test_dashboards_query_only_metrics_that_exist() -> None:
    exposed = exposed_metric_names()
    paths = sorted(DASHBOARDS.glob("*.json"))
    assert paths
    for path in paths:
        queries = dashboard_queries(json.loads(path.read_text()))
        queried = {m for q in queries for m in re.findall(r"\bavatar_[a-z0-9_]+", q)}
        assert queried, path.name
        assert queried <= exposed, f"{path.name}: unknown metrics {sorted(queried - exposed)}"


def test_the_stage_dashboard_charts_throughput_latency_lag_and_errors() -> None:
    queries = dashboard_queries(json.loads((DASHBOARDS / "avatar.json").read_text()))
    text = "\n".join(queries)
    for metric in ("avatar_stage_records_in_total", "avatar_stage_records_out_total",
                   "avatar_stage_e2e_latency_seconds_bucket",
                   "avatar_stage_process_seconds_bucket", "avatar_stage_consumer_lag",
                   "avatar_stage_dead_letters_total", "avatar_render_replaced_frames_total"):
        assert metric in text, metric
    assert text.count("histogram_quantile(0.95") >= 2
