"""llm-pool-worker: LLM completions behind a Redis Streams queue.

Importing this package is cheap: litellm is imported only by ``worker.router`` and the modules
it uses. The orchestrator's client is the ``client`` package, which imports none of ``worker``.
"""

__version__ = "0.1.0"
