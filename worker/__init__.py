"""llm-pool-worker: LLM completions behind a Redis Streams queue.

Importing this package is cheap: litellm is imported only by ``worker.router``, so that an
orchestrator can use ``worker.client`` without it.
"""

__version__ = "0.1.0"
