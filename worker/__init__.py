"""llm-pool-worker: LLM completions behind a Redis Streams queue.

Importing this package is cheap: litellm is imported only by ``llm_pool_worker.router`` and the
modules it uses. The orchestrator's client is ``llm_pool_client``, which imports none of this.
The repository's folder is ``worker/``; ``llm_pool_worker`` is its import name since 0.2.
"""

__version__ = "0.2.0"


if __name__ != "llm_pool_worker":  # this folder imported by its old name (from a checkout): be the new package
    from llm_pool_contracts.old_names import stand_in

    stand_in(__name__)
