"""The two stream paths side by side in one process: litellm's own and the lean parser, for
the OpenAI and Anthropic wire formats (200-token streams from the instant stand-in, 64 in flight).

    .venv/bin/python scripts/bench_paths.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import Bench, closed_loop

from llm_pool_contracts import Job

GROUPS = {"bench": "OpenAI format", "bench-anthropic": "Anthropic format"}
TOKENS, CALLS, CONCURRENCY = 200, 200, 64


async def main() -> None:
    with Bench(argparse.Namespace()) as env:
        from llm_pool_worker.model_config import load_model_config
        from llm_pool_worker.router import ModelRouter

        router = ModelRouter(load_model_config(env.config))
        await router.warm_up()
        print(f"{'format':18} {'path':8} {'tokens/s':>9} {'CPU ms/call':>12}")
        for group, label in GROUPS.items():
            job = Job(request_id="a", tenant_id="t", model=group, stream=True,
                      messages=[{"role": "user", "content": f"#tokens={TOKENS}"}])

            async def one(_: int, job: Job = job) -> None:
                await router.stream(job, lambda _text: False)

            for lean in (False, True):
                router.lean_streams = lean
                await closed_loop(8, 16, one)  # warm
                cpu = time.process_time()
                seconds = await closed_loop(CONCURRENCY, CALLS, one)
                cpu = time.process_time() - cpu
                path = "lean" if lean else "litellm"
                print(f"{label:18} {path:8} {TOKENS * CALLS / seconds:9.0f} {1000 * cpu / CALLS:12.1f}")


if __name__ == "__main__":
    asyncio.run(main())
