"""Every setting of a worker process, read once from the environment (CONTRACT.md §7)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_CONFIG = Path(__file__).with_name("models.yaml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_WORKER_", extra="ignore", populate_by_name=True)

    redis_url: SecretStr = Field(
        default=SecretStr("redis://localhost:6379/0"),
        validation_alias=AliasChoices("REDIS_URL", "LLM_WORKER_REDIS_URL"),
        description="Redis to use; a SecretStr because it may carry a password.",
    )
    config: Path = Field(default=BUNDLED_CONFIG, description="LiteLLM-proxy-style YAML of model groups.")
    prefix: str = Field(default="llm", pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    concurrency: int = Field(default=32, ge=1, le=100_000)
    processes: int = Field(
        default=1, ge=1, le=256,
        description="worker processes forked from one supervisor that imported litellm once (each has `concurrency` slots)",
    )
    heartbeat_s: float = Field(default=5.0, gt=0)
    result_ttl_s: int = Field(default=3600, ge=1)
    max_job_bytes: int = Field(default=1024 * 1024, ge=256)
    max_attempts: int = Field(default=3, ge=1)
    job_timeout_s: float = Field(default=600.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    chunk_window_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="wait this long after a token before publishing, so that more join its chunk; "
        "0 sends at once (tokens that arrive during a Redis round trip still share a chunk)",
    )
    lean_streams: bool = Field(
        default=True, description="parse OpenAI and Anthropic streams here instead of in litellm's wrapper"
    )
    max_backlog: int = Field(
        default=10_000, ge=0, description="jobs waiting in the interactive lane past which clients refuse new ones (0: no limit)"
    )
    max_batch_backlog: int = Field(
        default=1_000_000, ge=0, description="jobs waiting in the batch lane past which clients refuse new ones (0: no limit)"
    )
    resumable_streams: bool = Field(
        default=False, description="keep every job's replies in {prefix}:chunks:{request_id}, as if each job asked for it"
    )
    batch_share: float = Field(
        default=0.1, ge=0, le=1, description="share of a worker's slots the batch lane may always use when it has work"
    )
    shared_router_state: bool = Field(
        default=True, description="keep litellm's cooldowns and rpm/tpm counts in Redis, shared by every worker of the pool"
    )
    max_answer_chars: int = Field(
        default=1_000_000, ge=1000,
        description="longest answer (text plus tool arguments) a job may get; longer ends `answer_too_large`",
    )
    max_event_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="longest line of a provider's event stream; longer fails the deployment"
    )
    dead_max_len: int = Field(default=10_000, ge=1, description="dead letters kept at most (older ones are trimmed)")
    dead_max_age_days: float = Field(default=30, gt=0, description="dead letters older than this are trimmed")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="serve Prometheus metrics on this port")
    metrics_tenant_label: bool = Field(default=False, description="label job, token and cost metrics with the tenant")
    usage_retention_days: int = Field(
        default=400, ge=1, description="how long a day of a tenant's usage ledger is kept in Redis"
    )
    stream_restarts: int = Field(
        default=1, ge=0, description="times a stream that broke after chunks starts again as a new attempt"
    )

    gateway_host: str = Field(default="127.0.0.1", description="`llm-worker gateway` listens here")
    gateway_port: int = Field(default=8080, ge=1, le=65535, description="`llm-worker gateway` listens on this port")

    block_ms: int = Field(default=1000, ge=10, description="XREADGROUP BLOCK; kept under socket_timeout.")
    redis_socket_timeout_s: float = Field(default=5.0, gt=0)
    log_level: str = Field(default="INFO")
    log_format: str = Field(default="auto", pattern=r"^(auto|json|console)$")
    profile: Path | None = Field(default=None, description="write a pyinstrument CPU profile here at exit")

    @model_validator(mode="after")
    def _block_shorter_than_socket_timeout(self) -> Settings:
        # a blocking read longer than the socket timeout times out and retries forever (PITFALLS)
        if self.block_ms / 1000 >= self.redis_socket_timeout_s:
            raise ValueError("block_ms must be shorter than redis_socket_timeout_s")
        return self

    @property
    def heartbeat_ttl_s(self) -> int:
        return max(1, round(3 * self.heartbeat_s + 0.49))
