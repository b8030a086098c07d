"""Model groups from a LiteLLM-proxy-style YAML file, so that existing proxy configs can be reused.

Only ``model_list``, ``router_settings`` and ``litellm_settings`` are read. A deployment that
refers to an unset ``os.environ/NAME`` is left out with a warning, instead of failing on the
first job that reaches it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog
import yaml

from llm_pool_contracts import is_ident

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
class TenantLimits:
    """What one tenant may spend (the ``tenants:`` section; ``default`` for those not named)."""

    daily_budget_usd: float | None = None
    max_in_flight: int | None = None  # across the pool
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    deployments: tuple[Deployment, ...]
    router_settings: Mapping[str, Any] = field(default_factory=dict)
    litellm_settings: Mapping[str, Any] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()
    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)
    api_keys: Mapping[str, str] = field(default_factory=dict)  # the gateway's: SHA-256 (hex) of a key → tenant

    def limits(self, tenant_id: str) -> TenantLimits:
        return self.tenants.get(tenant_id) or self.tenants.get("default") or TenantLimits()

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
    return ModelConfig(tuple(deployments), settings, dict(raw.get("litellm_settings") or {}), tuple(left_out),
                       _parse_tenants(raw.get("tenants")), _parse_gateway(raw.get("gateway")))


TENANT_KEYS = ("daily_budget_usd", "max_in_flight", "rpm", "tpm")


def _parse_tenants(section: Any) -> dict[str, TenantLimits]:
    if not section:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError("`tenants` must map tenant ids (or `default`) to their limits")
    tenants = {}
    for name, limits in section.items():
        if not isinstance(limits, Mapping) or set(limits) - set(TENANT_KEYS):
            raise ConfigError(f"tenant `{name}`: limits must be a mapping of {', '.join(TENANT_KEYS)}")
        budget = limits.get("daily_budget_usd")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0):
            raise ConfigError(f"tenant `{name}`: `daily_budget_usd` must be a number ≥ 0")
        counts = {key: limits.get(key) for key in ("max_in_flight", "rpm", "tpm")}
        for key, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"tenant `{name}`: `{key}` must be an integer ≥ 1 (or null for no limit)")
        tenants[str(name)] = TenantLimits(float(budget) if budget is not None else None, **counts)
    return tenants


SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")


def _parse_gateway(section: Any) -> dict[str, str]:
    """The ``gateway:`` section's API keys, each only as the SHA-256 of the key (``llm-worker api-key hash``)."""
    if not section:
        return {}
    if not isinstance(section, Mapping) or set(section) - {"api_keys"} or not isinstance(section.get("api_keys") or [], list):
        raise ConfigError("`gateway` must be a mapping with `api_keys`: a list of {sha256, tenant}")
    keys: dict[str, str] = {}
    for i, entry in enumerate(section.get("api_keys") or []):
        if not isinstance(entry, Mapping) or set(entry) != {"sha256", "tenant"}:
            raise ConfigError(f"gateway.api_keys[{i}] must have exactly `sha256` and `tenant`")
        digest, tenant = str(entry["sha256"]).lower(), entry["tenant"]
        if not SHA256_HEX.match(digest):
            raise ConfigError(f"gateway.api_keys[{i}].sha256 must be 64 hex digits (llm-worker api-key hash), never the key itself")
        if not is_ident(tenant):
            raise ConfigError(f"gateway.api_keys[{i}].tenant must be a tenant id (letters, digits, . _ : -, at most 128)")
        keys[digest] = tenant
    return keys


def load_model_config(path: Path, env: Mapping[str, str] | None = None, check: bool = False) -> ModelConfig:
    """The config as the worker uses it; with ``check``, first refuse every problem that
    :func:`check_model_config` finds, in one line."""
    if check:
        problems = check_model_config(path)
        if problems:
            more = f" (and {len(problems) - 1} more: llm-worker check-config {path})" if len(problems) > 1 else ""
            raise ConfigError(problems[0] + more)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model config {path} is not a mapping")
    if env is DECLARED:
        env = {name: "set" for name in _env_refs(raw)}
    return parse_model_config(raw, env)


#: ``load_model_config(path, env=DECLARED)``: every group as declared, as if each ``os.environ/``
#: reference were set; for a process that calls no provider (the gateway) and holds no provider key.
DECLARED: Mapping[str, str] = MappingProxyType({})


# ---- checking a config as the worker would load it ---------------------------------------------

TOP_LEVEL = ("model_list", "router_settings", "litellm_settings", "tenants", "gateway", "general_settings",
             "environment_variables")
FALLBACK_KEYS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


def check_model_config(path: Path) -> list[str]:
    """Every problem of the config file, each ``<file>:<line>: <what is wrong>; <what is allowed>``.
    Keys that litellm would ignore in silence, or fail on with a traceback, are problems here."""
    try:
        text = path.read_text()
        tree, raw = yaml.compose(text), yaml.safe_load(text)
    except OSError as exc:
        return [f"{path}: cannot read it ({exc.strerror})"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return [f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({getattr(exc, 'problem', exc)})"]
    if not isinstance(raw, Mapping) or not isinstance(tree, yaml.MappingNode):
        return [f"{path}:1: the file must be a mapping with `model_list` (and `router_settings`, `litellm_settings`)"]
    at = _Lines(path, tree)
    problems = [at.line(key) + f"unknown top-level key `{key}`{_did_you_mean(key, TOP_LEVEL)}; known: {', '.join(TOP_LEVEL)}"
                for key in raw if key not in TOP_LEVEL]
    try:
        parse_model_config(raw, env={k: "set" for k in _env_refs(raw)})  # shape only: every variable counts as set
    except ConfigError as exc:
        problems.append(_where(at, str(exc)) + str(exc))
    problems += _router_problems(raw, at)
    return problems


def _where(at: _Lines, problem: str) -> str:
    """The line a parse problem is about: a tenant's entry, the tenants section, or the model list."""
    tenant = re.match(r"tenant `([^`]*)`", problem)
    if tenant:
        return at.line("tenants", tenant.group(1))
    if problem.startswith(("`gateway`", "gateway.")):
        return at.line("gateway")
    return at.line("tenants" if problem.startswith("`tenants`") else "model_list")


def _router_problems(raw: Mapping[str, Any], at: _Lines) -> list[str]:
    settings = raw.get("router_settings") or {}
    if not isinstance(settings, Mapping):
        return [at.line("router_settings") + "`router_settings` must be a mapping of litellm Router arguments"]
    allowed = _router_arguments()
    problems = [at.line("router_settings", key) + f"unknown router setting `{key}`{_did_you_mean(key, allowed)}"
                for key in settings if key not in allowed]
    groups = {e.get("model_name") for e in raw.get("model_list") or [] if isinstance(e, Mapping)}
    for key in FALLBACK_KEYS:
        for rule in settings.get(key) or []:
            for source, targets in (rule.items() if isinstance(rule, Mapping) else []):
                problems += [at.line("router_settings", key) + f"`{key}` from `{source}` to `{name}`, a group no deployment serves;"
                             f" groups: {', '.join(sorted(map(str, groups)))}" for name in [source, *(targets or [])] if name not in groups]
    return problems


def _router_arguments() -> frozenset[str]:

    from llm_pool_worker.router import router_arguments  # sets litellm up (a local price map) before importing it

    return frozenset(router_arguments())


def _env_refs(raw: Mapping[str, Any]) -> list[str]:
    listed = raw.get("model_list")
    entries: list[Any] = listed if isinstance(listed, list) else []
    return [name for e in entries if isinstance(e, Mapping) and isinstance(e.get("litellm_params"), Mapping)
            for name in missing_env(e["litellm_params"], {})]


def _did_you_mean(word: str, choices: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


class _Lines:
    """Line numbers of keys in the YAML file, for messages."""

    def __init__(self, path: Path, tree: yaml.MappingNode) -> None:
        self.path = path
        self.tree = tree

    def line(self, *keys: str) -> str:
        node: yaml.Node = self.tree
        line = 1
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                break
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        return f"{self.path}:{line}: "
