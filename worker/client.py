"""Deprecated home of the orchestrator's client: import ``client`` instead (kept for one release)."""

import warnings

from client import JobFailed, LLMClient, ReplyTimeout, make_job

warnings.warn("worker.client moved to the `client` package; import from there", DeprecationWarning, stacklevel=2)

__all__ = ["JobFailed", "LLMClient", "ReplyTimeout", "make_job"]
