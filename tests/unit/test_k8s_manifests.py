"""The Kubernetes deployment (infra/k8s) agrees with the code: every stage has a Deployment
and a scaler, every command parses with the package CLI, every PromQL query names metrics
the code exports, the Kafka trigger watches the stage's real group and topic, and every
selector finds the pods it means."""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # a test dependency: a missing one must fail, not skip
from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase

from backbone import metrics
from backbone.cli import build_parser
from backbone.settings import ENV_NAMES, Settings
from backbone.stages import PIPELINE, STAGES

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def docs(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        out.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def stage_of(deployment: dict[str, Any]) -> str | None:
    args = container(deployment)["args"]
    return args[1] if args[0] == "stage" else None


def exported_metric_names() -> set[str]:
    """Every series name backbone.metrics exports (histograms as _bucket/_sum/_count)."""
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            base = obj._name
            if isinstance(obj, Histogram):
                names |= {base + "_bucket", base + "_sum", base + "_count"}
            elif obj._type == "counter":
                names.add(base + "_total")
            else:
                names.add(base)
    return names


def test_every_file_in_the_folder_is_a_resource(kustomization: dict[str, Any]) -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_every_pipeline_stage_has_one_deployment(docs: list[dict[str, Any]]) -> None:
    stages = [stage_of(d) for d in of_kind(docs, "Deployment").values()]
    assert sorted(s for s in stages if s) == sorted(PIPELINE)


def test_the_gateway_and_session_index_have_deployments(docs: list[dict[str, Any]]) -> None:
    commands = {container(d)["args"][0] for d in of_kind(docs, "Deployment").values()}
    assert {"gateway", "index"} <= commands


def test_every_container_runs_a_command_of_the_package_cli(docs: list[dict[str, Any]]) -> None:
    workloads = list(of_kind(docs, "Deployment").values()) + list(of_kind(docs, "Job").values())
    assert len(workloads) == len(PIPELINE) + 3  # + gateway, index, topics job
    for w in workloads:
        c = container(w)
        assert c["command"] == ["avatar"], w["metadata"]["name"]
        assert c["image"].split(":")[0] == "avatar-backbone"
        try:
            args = build_parser().parse_args(c["args"])
        except SystemExit:
            pytest.fail(f"{w['metadata']['name']}: `avatar {' '.join(c['args'])}` does not parse")
        if args.command == "stage":
            assert args.name in STAGES


def test_every_stage_has_a_scaled_object_with_latency_and_lag_triggers(
        docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    scalers = of_kind(docs, "ScaledObject")
    for name, d in deployments.items():
        if stage_of(d) is None:
            continue
        targets = [s for s in scalers.values() if s["spec"]["scaleTargetRef"]["name"] == name]
        assert len(targets) == 1, name
        types = sorted(t["type"] for t in targets[0]["spec"]["triggers"])
        assert types == ["kafka", "prometheus"], name
    assert len(scalers) == len(PIPELINE)


def test_replicas_never_exceed_the_partitions(docs: list[dict[str, Any]]) -> None:
    partitions = int(of_kind(docs, "ConfigMap")["avatar-settings"]["data"]["AVATAR_PARTITIONS"])
    for name, s in of_kind(docs, "ScaledObject").items():
        assert 1 <= s["spec"]["minReplicaCount"] <= s["spec"]["maxReplicaCount"] <= partitions, name


def test_latency_queries_name_exported_metrics_of_their_own_stage(
        docs: list[dict[str, Any]]) -> None:
    exported = exported_metric_names()
    for name, s in of_kind(docs, "ScaledObject").items():
        stage = stage_of(of_kind(docs, "Deployment")[s["spec"]["scaleTargetRef"]["name"]])
        (prom,) = [t for t in s["spec"]["triggers"] if t["type"] == "prometheus"]
        query = prom["metadata"]["query"]
        used = set(re.findall(r"\bavatar_[a-z0-9_]+", query))
        assert used and used <= exported, (name, used - exported)
        assert f'stage="{stage}"' in query, name
        assert query.count("(") == query.count(")"), name
        # Latency is not divisible by replicas: compared as a Value, not a per-pod average.
        assert prom["metricType"] == "Value", name
        assert float(prom["metadata"]["threshold"]) > 0


def test_lag_triggers_watch_the_stages_own_group_and_input(docs: list[dict[str, Any]]) -> None:
    data = of_kind(docs, "ConfigMap")["avatar-settings"]["data"]
    settings = Settings(topic_prefix=data["AVATAR_TOPIC_PREFIX"],
                        group_prefix=data["AVATAR_GROUP_PREFIX"])
    for name, s in of_kind(docs, "ScaledObject").items():
        stage = stage_of(of_kind(docs, "Deployment")[s["spec"]["scaleTargetRef"]["name"]])
        assert stage is not None
        module, cls = STAGES[stage].split(":")
        inputs = getattr(importlib.import_module(module), cls).inputs
        (kafka,) = [t for t in s["spec"]["triggers"] if t["type"] == "kafka"]
        meta = kafka["metadata"]
        assert meta["consumerGroup"] == settings.group(stage), name
        assert meta["topic"] in {settings.topic(t) for t in inputs}, name
        assert meta["bootstrapServers"] == data["KAFKA_BOOTSTRAP"], name


def test_selectors_match_their_pods(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    components = [d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
                  for d in deployments.values()]
    assert len(set(components)) == len(components), "two Deployments select the same pods"
    for name, svc in of_kind(docs, "Service").items():
        selected = [d for d in deployments.values()
                    if svc["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            for d in selected:
                names = {p["name"] for p in container(d).get("ports", [])}
                assert port["targetPort"] in names, (name, d["metadata"]["name"])


def test_every_stage_is_behind_the_metrics_service(docs: list[dict[str, Any]]) -> None:
    svc = of_kind(docs, "Service")["avatar-stage-metrics"]
    for name, d in of_kind(docs, "Deployment").items():
        if stage_of(d) is not None:
            assert svc["spec"]["selector"].items() <= \
                d["spec"]["template"]["metadata"]["labels"].items(), name


def test_the_config_map_holds_only_settings_the_code_reads(docs: list[dict[str, Any]]) -> None:
    known = {env for env, _ in ENV_NAMES.values()} | {"AVATAR_LOG_LEVEL"}
    data = of_kind(docs, "ConfigMap")["avatar-settings"]["data"]
    assert set(data) <= known, set(data) - known
    assert data["AVATAR_METRICS_ADDR"] == "0.0.0.0"  # scrapable from another pod
    for w in list(of_kind(docs, "Deployment").values()) + list(of_kind(docs, "Job").values()):
        refs = [e["configMapRef"]["name"] for e in container(w)["envFrom"] if "configMapRef" in e]
        assert refs == ["avatar-settings"], w["metadata"]["name"]


def test_metrics_ports_match_the_configured_port(docs: list[dict[str, Any]]) -> None:
    port = int(of_kind(docs, "ConfigMap")["avatar-settings"]["data"]["AVATAR_METRICS_PORT"])
    for name, d in of_kind(docs, "Deployment").items():
        if stage_of(d) is not None:
            ports = {p["name"]: p["containerPort"] for p in container(d)["ports"]}
            assert ports["metrics"] == port, name
            annotations = d["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(port), name
