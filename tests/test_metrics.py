"""Prometheus metrics of a real worker process, scraped before and after known traffic, and the
Grafana dashboard held to them."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_pool_client import JobFailed, LLMClient
from scripts.localports import free_port, wait_for_port
from tests.conftest import ROOT
from tests.helpers import user

pytestmark = pytest.mark.slow
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_the_worker_did(spawn_worker: Any, client: LLMClient) -> None:
    port = free_port()
    process = spawn_worker(LLM_WORKER_METRICS_PORT=str(port))
    await asyncio.to_thread(process.wait_ready)
    wait_for_port(port)
    before = await asyncio.to_thread(scrape, port)
    assert value(before, "llm_worker_jobs_total", outcome="result", group="openai") == 0
    whole = [await client.complete("openai", user("a b c"), tenant_id="t", timeout=15) for _ in range(2)]
    events = [e async for e in client.stream("openai", user("d e f g"), tenant_id="t", timeout=15)]
    with pytest.raises(JobFailed):
        await client.complete("rejects", user("x"), tenant_id="t", timeout=15)
    await asyncio.sleep(1.5)  # the queue figures are sampled once a second
    after = await asyncio.to_thread(scrape, port)
    assert value(after, "llm_worker_jobs_total", outcome="result", group="openai") == 2
    assert value(after, "llm_worker_jobs_total", outcome="done", group="openai") == 1
    assert value(after, "llm_worker_jobs_total", outcome="bad_request", group="rejects") == 1
    completion = sum(r.usage.completion_tokens for r in whole) + events[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert value(after, "llm_worker_tokens_total", direction="completion", group="openai") == completion
    assert value(after, "llm_worker_cost_usd_total", group="openai") > 0
    assert value(after, "llm_worker_time_to_first_token_seconds_count", group="openai") == 1
    assert value(after, "llm_worker_provider_call_seconds_count", group="openai") == 3
    assert value(after, "llm_worker_jobs_in_flight") == 0
    assert events[-1].attempt == 1 and value(after, "llm_worker_stream_restarts_total", group="openai") == 0, "healthy jobs never restart"
    for lane in ("interactive", "batch"):
        assert ("llm_worker_queue_lag_entries", (("lane", lane),)) in after
        assert value(after, "llm_worker_queue_pending_entries", lane=lane) == 0
    assert not [key for key in after if "request_id" in dict(key[1])], "no unbounded labels"
    assert await asyncio.to_thread(process.stop) == 0


def test_the_dashboard_asks_only_for_metrics_the_worker_has() -> None:
    from llm_pool_worker.metrics import Metrics

    exposed = {m.name for m in Metrics(tenant_label=True).registry.collect()}
    names = set(re.findall(r"llm_worker_[a-z_]+", json.dumps(json.loads(DASHBOARD.read_text()))))
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
    assert bases and bases <= exposed, bases - exposed
    assert {m for m in exposed} <= bases, "every metric is on the dashboard"


def test_every_metric_is_documented() -> None:
    from llm_pool_worker.metrics import Metrics

    readme = (ROOT / "README.md").read_text()
    for metric in Metrics().registry.collect():
        suffix = "_total" if metric.type == "counter" else ""
        assert f"`{metric.name}{suffix}`" in readme, metric.name


