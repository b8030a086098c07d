"""Model groups from a LiteLLM-proxy-style YAML file, so that existing proxy configs can be reused.

Only ``model_list``, ``router_settings`` and ``litellm_settings`` are read. A deployment that
refers to an unset ``os.environ/NAME`` is left out with a warning, instead of failing on the
first job that reaches it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

log = structlog.get_logger(__name__)

ENV_REF = "os.environ/"
PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token")


class ConfigError(ValueError):
    """The model config file cannot be used."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """One entry of ``model_list``: a provider model serving a group."""

    id: str
    group: str
    model: str  # litellm_params.model, e.g. "anthropic/claude-sonnet-4-5"
    params: Mapping[str, Any]  # litellm_params as written, os.environ/ references unresolved
    info: Mapping[str, Any]

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    def entry(self) -> dict[str, Any]:
        """The ``model_list`` entry handed to litellm's Router."""
        return {"model_name": self.group, "litellm_params": dict(self.params), "model_info": {**self.info, "id": self.id}}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    deployments: tuple[Deployment, ...]
    router_settings: Mapping[str, Any] = field(default_factory=dict)
    litellm_settings: Mapping[str, Any] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(d.group for d in self.deployments)

    def by_id(self) -> dict[str, Deployment]:
        return {d.id: d for d in self.deployments}


def missing_env(params: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Names of the ``os.environ/NAME`` references in ``params`` that are unset or empty."""
    return [
        value[len(ENV_REF) :]
        for value in params.values()
        if isinstance(value, str) and value.startswith(ENV_REF) and not env.get(value[len(ENV_REF) :])
    ]


def _prune_fallbacks(fallbacks: Any, groups: frozenset[str]) -> list[dict[str, list[str]]]:
    kept: list[dict[str, list[str]]] = []
    for rule in fallbacks or []:
        if not isinstance(rule, Mapping):
            raise ConfigError(f"a fallback rule must map a group to a list of groups, not {rule!r}")
        for source, targets in rule.items():
            alive = [t for t in (targets or []) if t in groups]
            if source in groups and alive:
                kept.append({source: alive})
    return kept


def parse_model_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ModelConfig:
    env = os.environ if env is None else env
    entries = raw.get("model_list")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("`model_list` must be a non-empty list")
    deployments: list[Deployment] = []
    left_out: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("litellm_params"), Mapping):
            raise ConfigError(f"model_list[{i}] needs `model_name` and `litellm_params`")
        group, params = entry.get("model_name"), entry["litellm_params"]
        if not isinstance(group, str) or not isinstance(params.get("model"), str):
            raise ConfigError(f"model_list[{i}] needs a string `model_name` and `litellm_params.model`")
        info = dict(entry.get("model_info") or {})
        unset = missing_env(params, env)
        if unset:
            left_out.append(f"{group}:{params['model']}")
            log.warning("deployment left out", group=group, model=params["model"], unset_env=unset)
            continue
        deployments.append(Deployment(str(info.get("id") or f"{group}/{i}"), group, params["model"], dict(params), info))
    if not deployments:
        raise ConfigError("no deployment is usable: every one refers to an unset environment variable")
    settings = dict(raw.get("router_settings") or {})
    groups = frozenset(d.group for d in deployments)
    for key in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        if key in settings:
            settings[key] = _prune_fallbacks(settings[key], groups)
    return ModelConfig(tuple(deployments), settings, dict(raw.get("litellm_settings") or {}), tuple(left_out))


def load_model_config(path: Path, env: Mapping[str, str] | None = None) -> ModelConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model config {path} is not a mapping")
    return parse_model_config(raw, env)
