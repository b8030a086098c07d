"""The deployment files agree with the worker: their probes are real commands, their entry point is
`python -m llm_pool_worker`, their stop grace covers the worker's, and their model config passes the check.
(This machine has no Docker daemon: the image itself is not built here.)"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import yaml

from llm_pool_worker.cli import parse_args
from llm_pool_worker.model_config import check_model_config
from llm_pool_worker.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
GRACE_S = Settings.model_fields["shutdown_grace_s"].default


def kubernetes() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}


def test_kubernetes_probes_run_real_commands_and_the_grace_covers_the_drain(tmp_path: Path) -> None:
    docs = kubernetes()
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["command"] == ["python", "-m", "llm_pool_worker"]
    probes = [container[p]["exec"]["command"] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
    for command in probes:
        assert command[0] == "llm-worker"
        parse_args(command[1:])  # argparse exits on a command the CLI does not have
    assert {c[1] for c in probes} == {"health", "ready"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["terminationGracePeriodSeconds"] > float(env["LLM_WORKER_SHUTDOWN_GRACE_S"])
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    models = tmp_path / "models.yaml"
    models.write_text(docs["ConfigMap"]["data"]["models.yaml"])
    assert check_model_config(models) == []


def test_the_image_runs_the_worker_as_a_user_and_probes_it() -> None:
    lines = [line.split(None, 1) for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    instructions = {word: rest for word, *rest_list in lines for rest in rest_list}
    assert instructions["CMD"] == '["python", "-m", "llm_pool_worker"]'
    assert instructions["USER"] == "worker"
    assert '"llm-worker", "health"' in instructions["HEALTHCHECK"]


def test_systemd_stops_after_the_drain() -> None:
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(DEPLOY / "llm-worker@.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("python -m llm_pool_worker") and service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > GRACE_S and service["User"] != "root"


def test_compose_runs_redis_the_stand_in_two_workers_and_the_gateway() -> None:
    from llm_pool_worker.cli import parse_args

    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert set(services) == {"redis", "model", "worker", "gateway"}
    gateway = parse_args(services["gateway"]["command"][1:])  # a real command of the CLI, with real flags
    assert gateway.command == "gateway" and gateway.host == "0.0.0.0"
    assert services["gateway"]["ports"] == [f"127.0.0.1:{gateway.port}:{gateway.port}"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["environment"]["OLLAMA_API_BASE"].endswith(":18434")
