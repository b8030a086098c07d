"""The pool behind HTTP (``llm-worker gateway``, the ``[gateway]`` extra): the seed's API and OpenAI's.

It enqueues through the orchestrators' client and never calls a provider, so every request is
a job with the pool's durability, limits and accounting. It imports no litellm.
"""


if __name__ != "llm_pool_gateway":  # this folder imported by its old name (from a checkout): be the new package
    from llm_pool_contracts.old_names import stand_in

    stand_in(__name__)
