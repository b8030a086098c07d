"""The private parts of litellm the worker reads beyond the lean path, each with its fallback.

litellm ships several releases a week, and any of these may move. Each is read here, in one
place, by a function that answers ``{}`` or ``None`` when it is gone, so that a call never breaks
on one. ``missing`` asks them all once, at warm-up, so that a worker on a drifted litellm says in
one WARNING what it serves without, instead of serving less well in silence. (The lean path's own
hooks are checked by ``llm_pool_worker.selfcheck``; closing a stream that ended early needs none:
the transport closes every body of a call when the call is over.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

PROBE_ID: Final = "llm-worker-parts-probe"  # a deployment id no config has: cooling it down touches nothing

LOST: Final = {
    "hidden_params": "_hidden_params['model_id'] (which deployment answered): replies name the model group as "
                     "provider_model and carry no cost_usd; a broken stream cools no deployment down; lean streams' "
                     "tokens are not counted against tpm",
    "cooldowns": "Router.health().cooldowns: a stream that breaks after tokens does not cool its deployment down, "
                 "so its restart may go to the same deployment",
}


def hidden_params(answer: Any) -> Mapping[str, Any]:
    """What litellm notes on an answer, privately: ``model_id`` (the deployment), its model name."""
    hidden = getattr(answer, "_hidden_params", None)
    return hidden if isinstance(hidden, Mapping) else {}


def cooldowns(router: Any) -> Any | None:
    """The Router's cooldown store, where a stream broken after tokens is reported."""
    with contextlib.suppress(Exception):
        store = router.health().cooldowns
        if callable(getattr(store, "add_deployment_to_cooldown", None)):
            return store
    return None


def rate_limit_check(router: Any) -> Any | None:
    """The check that holds deployments to their ``tpm``; a lean stream's tokens are reported to it."""
    for check in getattr(router, "optional_callbacks", None) or ():
        if type(check).__name__ == "ModelRateLimitingCheck" and callable(getattr(check, "async_log_success_event", None)):
            return check
    return None


def missing(router: Any, answers: Iterable[Any], deployment_ids: Collection[str]) -> list[str]:
    """What of the above this litellm lacks, each with what a worker does without it."""
    lost = []
    if not all(hidden_params(answer).get("model_id") in deployment_ids for answer in answers):
        lost.append(LOST["hidden_params"])
    if not _cooldowns_work(router):
        lost.append(LOST["cooldowns"])
    return lost


def _cooldowns_work(router: Any) -> bool:
    store = cooldowns(router)
    if store is None:
        return False
    with contextlib.suppress(Exception):
        store.add_deployment_to_cooldown(PROBE_ID, RuntimeError("probe"), 500, 60.0)
        return any(found[0] == PROBE_ID for found in store.get_active_cooldowns([PROBE_ID], None))
    return False
