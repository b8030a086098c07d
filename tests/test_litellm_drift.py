"""A litellm whose internals drifted from what the worker reads (the lean path's hooks, the transport's,
answers' hidden params, the cooldown store, a stream's close): the worker says which part in one
WARNING at start-up, naming litellm's version, and serves without it, never breaking a call. The
drift is simulated in the worker process, before it starts."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Chunk, Done
from tests.conftest import ROOT, StandIn, model_config, worker_env
from tests.helpers import marker, user

pytestmark = pytest.mark.slow

# litellm's answers (whole and streamed) without the attributes named in GONE, which a later
# litellm may have renamed; litellm itself still has them, so only the worker's reads miss
ANSWERS_LACK = """
import litellm.router
class Drifted:
    def __init__(self, inner): object.__setattr__(self, "inner", inner)
    def __getattr__(self, name):
        if name in GONE: raise AttributeError(name)
        return getattr(self.inner, name)
    def __aiter__(self): return self
    async def __anext__(self): return await self.inner.__anext__()
original = litellm.router.Router.acompletion
KEPT = []  # as litellm's logging may keep an answer: a dropped stream is not collected, and so not closed
async def acompletion(self, *args, **kwargs):
    KEPT.append(await original(self, *args, **kwargs))
    return Drifted(KEPT[-1])
litellm.router.Router.acompletion = acompletion
"""
DRIFTS = {
    "none": "",  # the supported litellm: the probes pass, and the worker says nothing
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
    # answers that no longer say which deployment gave them
    "answers-lack-hidden-params": "GONE = {'_hidden_params'}" + ANSWERS_LACK,
    # streams that can no longer be closed through litellm's wrapper: the transport closes them
    "streams-lack-aclose": "GONE = {'aclose', '_async_generator'}" + ANSWERS_LACK,
    # a Router whose health view moved its cooldown store (litellm's own code uses the new name,
    # so only callers outside litellm find it gone)
    "router-moved-cooldowns": """
import sys, litellm.router
class Health:
    def __init__(self, inner): self.inner = inner
    def __getattr__(self, name):
        if name == "cooldowns": raise AttributeError("'RouterHealth' object has no attribute 'cooldowns'")
        return getattr(self.inner, name)
original = litellm.router.Router.health
def health(self):
    inside = sys._getframe(1).f_globals.get("__name__", "").startswith("litellm")
    return original(self) if inside else Health(original(self))
litellm.router.Router.health = health
""",
    # a litellm that renamed the check holding deployments to their tpm (it still runs it)
    "renamed-the-tpm-check": """
from litellm.router_utils.pre_call_checks.model_rate_limit_check import ModelRateLimitingCheck
ModelRateLimitingCheck.__name__ = ModelRateLimitingCheck.__qualname__ = "DeploymentTokenLimits"
""",
}
EXPECTED = {
    "none": None,
    "ignores-the-installed-client": "the tap never saw the OpenAI stream",
    "lacks-a-hook": "create_httpx_proxy_mounts",
    "answers-lack-hidden-params": "replies name the model group as provider_model and carry no cost_usd",
    "streams-lack-aclose": None,
    "router-moved-cooldowns": "Router.health().cooldowns",
    "renamed-the-tpm-check": "lacks the check that counts tokens against tpm",
}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("drift", sorted(DRIFTS))
async def test_a_drifted_litellm_is_named_once_and_served_without_what_it_lacks(
    drift: str, settings: Any, client: LLMClient, standin: StandIn, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    code = DRIFTS[drift] + "\nfrom llm_pool_worker.cli import main\nmain(['run'])\n"
    config = model_config(standin.url)  # with a tpm limit (never reached), so that lean streams count tokens
    next(d for d in config["model_list"] if d["model_name"] == "openai")["litellm_params"]["tpm"] = 10_000_000
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(config))
    env = worker_env(settings, LLM_WORKER_CONFIG=str(tmp_path / "models.yaml"),
                     LLM_WORKER_MAX_ANSWER_CHARS="1000")  # for the stream ended early, below
    if drift == "streams-lack-aclose":  # litellm's own path, where litellm's wrapper holds the stream
        env["LLM_WORKER_LEAN_STREAMS"] = "false"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        await answers_come_out_whole(client, knows_the_deployment=drift != "answers-lack-hidden-params")
        if drift in ("none", "router-moved-cooldowns"):
            await a_broken_stream_restarts(client, cooled_down=drift == "none")
        if drift in ("none", "streams-lack-aclose"):
            await a_stream_ended_early_closes_its_connection(client, standin)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line.get("level") == "warning" and "litellm" in line]
    if EXPECTED[drift] is None:
        assert warnings == [], log.read_text()
    else:
        assert len(warnings) == 1, log.read_text()
        assert warnings[0]["litellm"] == importlib.metadata.version("litellm")
        assert EXPECTED[drift] in json.dumps(warnings[0])
    assert not [line for line in lines if line.get("level") in ("error", "critical")]


async def answers_come_out_whole(client: LLMClient, knows_the_deployment: bool) -> None:
    """A stream, a whole answer and a streamed tool call, each as the stand-in sent it. Without the
    deployment, an answer names its group and carries no price rather than a wrong one."""
    streamed = [e async for e in client.stream("openai", user("#tokens=40"), tenant_id="t", timeout=60)]
    assert "".join(e.text for e in streamed if isinstance(e, Chunk)) == " ".join(f"t{i}" for i in range(40))
    done = streamed[-1]
    assert isinstance(done, Done) and (done.usage.completion_tokens, done.usage.estimated) == (40, False)
    whole = await client.complete("openai", user("whole answer"), tenant_id="t", timeout=60)
    assert (whole.content, whole.usage.estimated) == ("whole answer", False)
    for answer in (done, whole):
        if knows_the_deployment:
            assert answer.provider_model == "openai/gpt-4o-mini" and answer.cost_usd
        else:
            assert (answer.provider_model, answer.cost_usd) == ("openai", None)
    tool = [e async for e in client.stream("anthropic", user("call it #tool"), tenant_id="t", tools=TOOLS, timeout=60)][-1]
    assert isinstance(tool, Done) and [c.function.name for c in tool.tool_calls] == ["lookup"]


async def a_stream_ended_early_closes_its_connection(client: LLMClient, standin: StandIn) -> None:
    """A stream that the worker ends between two chunks (its answer grew past the bound): the
    provider sees its connection closed at once."""
    mark = marker()
    with pytest.raises(JobFailed, match="answer_too_large"):
        async for _ in client.stream("openai", user(f"{mark} #tokens=1000 #slow=10"), tenant_id="t", timeout=30):
            pass
    for _ in range(20):
        [call] = standin.calls_with(mark)
        if call.get("disconnected"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the provider's connection stayed open: {call}")


async def a_broken_stream_restarts(client: LLMClient, cooled_down: bool) -> None:
    """A stream that breaks after three tokens is restarted. With the cooldown store, the restart
    goes to the group's sound deployment; without it (the warning says so) it may go to the same
    one, as on litellm's own path, and the job ends `interrupted`: one clear error, nothing hangs."""
    if cooled_down:
        done = [e async for e in client.stream("restarts", user("#tokens=8"), tenant_id="t", timeout=60)][-1]
        assert isinstance(done, Done) and (done.attempt, done.provider_model) == (2, "openai/gpt-4o-mini")
        return
    with pytest.raises(JobFailed) as caught:
        _ = [e async for e in client.stream("restarts", user("#tokens=8"), tenant_id="t", timeout=60)]
    assert caught.value.code == "interrupted"
