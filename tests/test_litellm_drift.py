"""A litellm whose internals drifted from what the lean path and the transport expect: the worker
says which part in one WARNING at start-up, naming litellm's version, and serves on litellm's own
path, never breaking a call. The drift is simulated in the worker process, before it starts."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llm_pool_client import LLMClient
from llm_pool_contracts import Chunk, Done
from tests.conftest import ROOT, worker_env
from tests.helpers import user

pytestmark = pytest.mark.slow

DRIFTS = {
    "none": "",  # the supported litellm: the probe passes, and the worker says nothing
    # a litellm that makes its own HTTP clients instead of using the ones the worker installs
    "ignores-the-installed-client": """
import litellm, llm_pool_worker.router as router, llm_pool_worker.transport as transport
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler
def drifted(*args, **kwargs):
    installed = transport.install_transport(*args, **kwargs)
    litellm.aclient_session, litellm.module_level_aclient = None, AsyncHTTPHandler()
    return installed
router.install_transport = drifted
""",
    # a litellm that renamed a hook the transport is built with (litellm itself has moved on to the
    # new name, so only the worker's lookup fails; deleting the name would break litellm too)
    "lacks-a-hook": """
import llm_pool_worker.router as router
def renamed(*args, **kwargs):
    raise AttributeError("type object 'AsyncHTTPHandler' has no attribute 'create_httpx_proxy_mounts'")
router.install_transport = renamed
""",
}
EXPECTED = {"none": "", "ignores-the-installed-client": "the tap never saw the OpenAI stream", "lacks-a-hook": "create_httpx_proxy_mounts"}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("drift", sorted(DRIFTS))
async def test_a_drifted_litellm_is_named_once_and_served_on_its_own_path(
    drift: str, settings: Any, client: LLMClient, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    code = DRIFTS[drift] + "\nfrom llm_pool_worker.cli import main\nmain(['run'])\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=worker_env(settings), cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        streamed = [e async for e in client.stream("openai", user("#tokens=40"), tenant_id="t", timeout=60)]
        assert "".join(e.text for e in streamed if isinstance(e, Chunk)) == " ".join(f"t{i}" for i in range(40))
        done = streamed[-1]
        assert isinstance(done, Done) and (done.usage.completion_tokens, done.usage.estimated) == (40, False)
        tool = [e async for e in client.stream("anthropic", user("call it #tool"), tenant_id="t", tools=TOOLS, timeout=60)][-1]
        assert isinstance(tool, Done) and [c.function.name for c in tool.tool_calls] == ["lookup"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line.get("level") == "warning" and "litellm's own path" in line["event"]]
    if drift == "none":
        assert warnings == [], log.read_text()
    else:
        assert len(warnings) == 1, log.read_text()
        assert warnings[0]["litellm"] == importlib.metadata.version("litellm")
        assert EXPECTED[drift] in json.dumps(warnings[0])
    assert not [line for line in lines if line.get("level") in ("error", "critical")]
