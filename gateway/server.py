"""``llm-worker gateway``: the app on uvicorn, with the worker's logging and its SIGTERM grace."""

from __future__ import annotations

import uvicorn

from llm_pool_gateway.app import create_app
from llm_pool_worker.settings import Settings


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT; requests in flight get ``shutdown_grace_s`` to finish."""
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # one line per request would be the gateway's busiest work
        log_config=None,  # structlog, configured by the CLI, formats uvicorn's few lines too
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        server_header=False,
    )
    uvicorn.Server(config).run()
