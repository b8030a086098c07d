"""Logging: structlog for our lines, the standard library's records (litellm, redis) through the same
renderer. JSON lines when stderr is not a terminal, a readable console otherwise.

Each job's lines carry its request_id and tenant_id through structlog's contextvars; prompts and
outputs are logged only at debug level, and secrets never.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import structlog
from structlog.typing import Processor

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
# how litellm (and many others) shows a key it "masks": a few characters each side of asterisks
MASKED = re.compile(r"[\w.-]{0,8}\*{3,}[\w.-]{0,8}")


def secrets_of(redis_url: str, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Values that must never be logged: the Redis password, and every variable named like a key."""
    environ = os.environ if environ is None else environ
    found = [value for name, value in environ.items() if SECRET_NAME.search(name) and value]
    password = urlsplit(redis_url).password
    return [*found, *([password] if password else [])]


class Redact:
    """A processor that takes known secrets, and masked keys, out of every string of a log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
        return event

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return MASKED.sub("[redacted]", text) if "***" in text else text


def configure_logging(level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    redact = Redact(secrets)
    renderers: list[Processor] = (
        [structlog.processors.format_exc_info, redact, structlog.processors.JSONRenderer()]
        if use_json
        else [redact, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
