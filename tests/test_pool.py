"""Many worker processes behave as one pool: litellm's router state is shared through Redis.

Three worker processes serve the same groups. A deployment's ``rpm`` holds across all of them
(counted per window at the stand-in), and a deployment that failed in one worker is skipped by
the others while it cools down.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import yaml

from llm_pool_client import LLMClient
from llm_pool_contracts import Done
from tests.conftest import StandIn
from tests.helpers import marker, user

RPM = 3
TPM = 60


def pool_config(standin: StandIn, path: Path) -> Path:
    v1 = standin.url + "/v1"

    def dep(group: str, model: str, order: int, **extra: Any) -> dict[str, Any]:
        return {"model_name": group, "litellm_params": {"model": model, "api_base": v1, "api_key": "sk-test", "order": order, **extra}}

    path.write_text(yaml.safe_dump({
        "model_list": [
            dep("capped", "openai/stand-in-capped", 1, rpm=RPM),
            dep("capped", "openai/gpt-4o-mini", 2),
            dep("tpm-capped", "openai/stand-in-tpm", 1, tpm=TPM),
            dep("tpm-capped", "openai/gpt-4o-mini", 2),
            dep("cools", "openai/fail-503", 1),
            dep("cools", "openai/gpt-4o-mini", 2),
        ],
        "router_settings": {"num_retries": 2, "retry_after": 0, "timeout": 5, "allowed_fails": 0, "cooldown_time": 60},
    }))
    return path


async def three_workers(spawn_worker: Any, config: Path) -> list[Any]:
    workers = [spawn_worker(LLM_WORKER_CONFIG=str(config), LLM_WORKER_CONCURRENCY="4") for _ in range(3)]
    for process in workers:
        await asyncio.to_thread(process.wait_ready)
    return workers


def served_by(workers: list[Any]) -> collections.Counter[int]:
    return collections.Counter(i for i, w in enumerate(workers) for line in w.log_lines() if line.get("event") == "job done")


async def test_a_deployments_rpm_holds_across_the_pool(
    spawn_worker: Any, client: LLMClient, standin: StandIn, tmp_path: Path
) -> None:
    workers = await three_workers(spawn_worker, pool_config(standin, tmp_path / "pool.yaml"))
    mark = marker()
    results = await asyncio.gather(*[
        client.complete("capped", user(f"{mark} {i}"), tenant_id="t", timeout=30) for i in range(12)
    ])
    calls = standin.calls_with(mark)
    capped = collections.Counter(int(c["at"] // 60) for c in calls if c["model"] == "stand-in-capped")
    assert all(r.content.startswith(mark) for r in results), "every job answered"
    assert capped and max(capped.values()) <= RPM, f"calls per minute: {dict(capped)}"
    assert len(calls) == 12, "one provider call per job: the overflow went to the next deployment"
    assert len(served_by(workers)) >= 2, "the jobs were spread over the workers"


async def test_a_deployment_cooled_down_in_one_worker_is_skipped_by_the_others(
    spawn_worker: Any, client: LLMClient, standin: StandIn, tmp_path: Path
) -> None:
    workers = await three_workers(spawn_worker, pool_config(standin, tmp_path / "pool.yaml"))
    mark = marker()
    for i in range(9):  # one at a time: blocked readers take turns, so each worker serves some
        result = await client.complete("cools", user(f"{mark} {i}"), tenant_id="t", timeout=30)
        assert result.content == f"{mark} {i}"
    failing = [c for c in standin.calls_with(mark) if c["model"] == "fail-503"]
    assert len(served_by(workers)) == 3
    assert len(failing) == 1, "only the first worker tried the failing deployment; the others saw its cooldown"


async def test_a_deployments_tpm_counts_lean_streams(
    spawn_worker: Any, client: LLMClient, standin: StandIn, tmp_path: Path
) -> None:
    await three_workers(spawn_worker, pool_config(standin, tmp_path / "pool.yaml"))
    mark = marker()
    for i in range(8):  # 20 tokens out each (and a few in): the limit is reached after the third
        events = [e async for e in client.stream("tpm-capped", user(f"{mark} {i} #tokens=20"), tenant_id="t", timeout=30)]
        assert isinstance(events[-1], Done)
    capped = [c for c in standin.calls_with(mark) if c["model"] == "stand-in-tpm"]
    assert 2 <= len(capped) <= 4, "the streams' tokens were counted against the deployment's tpm"
