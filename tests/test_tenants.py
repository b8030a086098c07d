"""Tenants' limits from the model config: a daily budget, read from the usage ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from client import JobFailed, LLMClient
from contracts import ErrorCode, decode_reply
from tests.conftest import StandIn
from tests.helpers import marker, user
from worker.model_config import check_model_config


async def test_a_tenant_past_its_daily_budget_is_refused_without_a_model_call(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, config_path: Path, standin: StandIn, tmp_path: Path
) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["tenants"] = {"thrifty": {"daily_budget_usd": 0.05}, "default": {"daily_budget_usd": None}}
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(config))
    worker = spawn_worker(LLM_WORKER_CONFIG=str(tmp_path / "tenants.yaml"))
    await asyncio.to_thread(worker.wait_ready)
    mark = marker()
    spent = []
    with pytest.raises(JobFailed) as refused:
        for i in range(20):  # the "ledger" group costs $0.001 a prompt token and $0.002 a completion token
            result = await client.complete("ledger", user(f"{mark} {i} #tokens=5"), tenant_id="thrifty", timeout=20)
            spent.append(result.cost_usd)
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED and "daily budget is $0.05" in refused.value.message
    assert sum(spent[:-1]) < 0.05 <= sum(spent), "refused from the first job after the budget was reached"
    assert len(standin.calls_with(mark)) == len(spent), "the refused job never reached the model"
    [row] = await client.usage(tenant_id="thrifty")
    assert row.errors == {"quota_exceeded": 1} and abs(row.cost_usd - sum(spent)) < 1e-9
    assert await redis.xlen(client.keys.dead) == 0, "a refusal is not dead-lettered"
    stored = decode_reply(await redis.get(client.keys.result(refused.value.error.request_id)))
    assert stored == refused.value.error
    other = await client.complete("ledger", user(f"{mark} other"), tenant_id="rich", timeout=20)
    assert other.content == f"{mark} other", "other tenants are not limited"
    assert await asyncio.to_thread(worker.stop) == 0


def test_check_config_names_a_bad_tenant_limit_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "model_list:\n  - model_name: fast\n    litellm_params: {model: openai/gpt-4o-mini, api_key: sk-x}\n"
        "tenants:\n  default: {daily_budget_usd: 10}\n  acme: {daily_budget: 5}\n"
    )
    [problem] = check_model_config(path)
    assert problem.startswith(f"{path}:6: tenant `acme`") and "daily_budget_usd" in problem
