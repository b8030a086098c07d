"""The pool behind HTTP (``llm-worker gateway``, the ``[gateway]`` extra): the seed's API and OpenAI's.

It enqueues through the orchestrators' client and never calls a provider, so every request is
a job with the pool's durability, limits and accounting. It imports no litellm.
"""
