"""Configuration mistakes, through the real command line: each is one line that names the variable
(or the file and line), says what is wrong, exits non-zero, and never shows a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CLI = str(Path(sys.executable).with_name("llm-worker"))
PASSWORD = "Zq8xVw3Lp0Ty7Hc"
API_KEY = "sk-Jm4Rt9Qw2Xe6Ub1Yk"


def llm_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_") and k != "REDIS_URL"}
    return subprocess.run([CLI, *args], env={**clean, "OPENAI_API_KEY": API_KEY, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def assert_one_clean_line(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output and len(done.stderr.strip().splitlines()) == 1, output
    for text in expected:
        assert text in done.stderr, done.stderr
    for secret in (PASSWORD, API_KEY):
        assert not any(secret[i : i + 4] in output for i in range(len(secret) - 3)), "no part of a secret"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {"LLM_WORKER_CONCURRENCY": "abc"}, ("LLM_WORKER_CONCURRENCY", "integer")),
        ((), {"REDIS_URL": f"redis://:{PASSWORD}@example:6379/0", "LLM_WORKER_HEARTBEAT_S": "-1"}, ("LLM_WORKER_HEARTBEAT_S",)),
        (("--redis-url", f"redis://:{PASSWORD}@example:6379/0", "--concurrency", "0"), {}, ("--concurrency", "greater")),
        ((), {"LLM_WORKER_LOG_FORMAT": "xml", "REDIS_URL": f"redis://u:{PASSWORD}@h/0"}, ("LLM_WORKER_LOG_FORMAT",)),
        ((), {"LLM_WORKER_CONCURENCY": "4"}, ("unknown variable LLM_WORKER_CONCURENCY", "LLM_WORKER_CONCURRENCY")),
    ],
    ids=["not-a-number", "out-of-range-with-a-password-in-the-env", "flags-with-a-password", "not-allowed", "typo"],
)
def test_a_bad_setting_is_one_line_naming_it(args: tuple[str, ...], env: dict[str, str], expected: tuple[str, ...]) -> None:
    assert_one_clean_line(llm_worker("run", *args, **env), *expected)


BAD_TOP = """model_list:
  - model_name: fast
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
router_setting:
  num_retries: 2
"""
BAD_ROUTER = """model_list:
  - model_name: fast
    litellm_params: {model: openai/gpt-4o-mini}
router_settings:
  num_retries: 2
  fallback:
    - fast: [quality]
  fallbacks:
    - fast: [qualty]
"""


def test_check_config_names_each_problem_with_its_line(tmp_path: Path) -> None:
    top, router = tmp_path / "top.yaml", tmp_path / "router.yaml"
    top.write_text(BAD_TOP)
    router.write_text(BAD_ROUTER)
    first = llm_worker("check-config", str(top))
    assert first.returncode == 1
    assert first.stdout.strip() == (f"{top}:4: unknown top-level key `router_setting` (did you mean `router_settings`?); "
                                    "known: model_list, router_settings, litellm_settings, tenants, gateway, general_settings, environment_variables")
    second = llm_worker("check-config", str(router))
    assert second.returncode == 1
    assert second.stdout.splitlines() == [
        f"{router}:6: unknown router setting `fallback` (did you mean `fallbacks`?)",
        f"{router}:8: `fallbacks` from `fast` to `qualty`, a group no deployment serves; groups: fast",
    ]
    plain_key = tmp_path / "key.yaml"  # a gateway key written in the clear, where only its hash belongs
    plain_key.write_text(BAD_TOP.split("router_setting:", maxsplit=1)[0] + "gateway:\n  api_keys:\n    - {sha256: lpw-secret, tenant: acme}\n")
    third = llm_worker("check-config", str(plain_key))
    assert third.returncode == 1 and third.stdout.strip() == (
        f"{plain_key}:4: gateway.api_keys[0].sha256 must be 64 hex digits (llm-worker api-key hash), never the key itself")
    bundled = llm_worker("check-config", str(ROOT / "worker" / "models.yaml"))
    assert bundled.returncode == 0 and bundled.stdout.strip().endswith("ok")


def test_the_worker_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "router.yaml"
    bad.write_text(BAD_ROUTER)
    done = llm_worker("run", LLM_WORKER_CONFIG=str(bad), REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:1/0")
    assert_one_clean_line(done, f"{bad}:6: unknown router setting `fallback`", "and 1 more")
    assert done.returncode == 2


@pytest.mark.slow
async def test_no_part_of_an_api_key_reaches_the_log_even_at_debug(
    tmp_path: Path, spawn_worker: Any, client: Any, standin: Any
) -> None:
    """litellm's request log at DEBUG shows a masked key (its first and last characters)."""
    import asyncio

    import yaml

    config = tmp_path / "keyed.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "keyed", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": standin.url + "/v1", "api_key": "os.environ/LLM_POOL_TEST_SECRET_KEY"}}]}))
    process = spawn_worker(LLM_WORKER_CONFIG=str(config), LLM_WORKER_LOG_LEVEL="DEBUG", LLM_POOL_TEST_SECRET_KEY=API_KEY)
    await asyncio.to_thread(process.wait_ready)
    assert (await client.complete("keyed", [{"role": "user", "content": "hello"}], tenant_id="t", timeout=30)).content == "hello"
    [e async for e in client.stream("keyed", [{"role": "user", "content": "hi there"}], tenant_id="t", timeout=30)]
    assert await asyncio.to_thread(process.stop) == 0
    text = process.log_path.read_text()
    assert "hello" in text and len(text.splitlines()) > 20, "the log is at DEBUG"
    assert not [API_KEY[i : i + 4] for i in range(len(API_KEY) - 3) if API_KEY[i : i + 4] in text], "no part of the key"
