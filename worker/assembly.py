"""Builds one answer out of streamed deltas: text, tool-call fragments, finish reason, usage.

Nothing a provider sends is trusted blindly: the answer may not grow past its bound, and token
counts that are not whole numbers in a sane range are dropped, so that the usage is estimated
(and marked so) instead of corrupting a ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_pool_contracts import FunctionCall, ToolCall, Usage


@dataclass(slots=True)
class Completion:
    """A provider's whole answer, in the terms of the wire contract."""

    content: str
    tool_calls: list[ToolCall]
    usage: Usage
    provider_model: str
    finish_reason: str
    cost_usd: float | None


MAX_TOKENS_PER_CALL = 100_000_000  # far above any model's window: a count past it is garbage


class AnswerTooLarge(Exception):
    """The answer grew past the worker's bound on answer size."""


def token_count(value: object) -> int | None:
    """A provider's token count, if it is a believable one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_TOKENS_PER_CALL else None


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamAssembler:
    """Collects deltas as they arrive, keeping only what the final message needs."""

    __slots__ = ("_calls", "_size", "_text", "completion_tokens", "finish_reason", "max_chars", "prompt_tokens")

    def __init__(self, max_chars: int | None = None) -> None:
        self.max_chars = max_chars  # bound on text plus tool arguments
        self._size = 0
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def add_text(self, text: str) -> None:
        self._grow(len(text))
        self._text.append(text)

    def _grow(self, size: int) -> None:
        self._size += size
        if self.max_chars is not None and self._size > self.max_chars:
            raise AnswerTooLarge(f"the answer is over the limit of {self.max_chars} characters")

    def add_tool_fragment(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _PartialCall()
        if call_id:
            call.id = call_id
        if name:
            call.name += name
        if arguments:
            self._grow(len(arguments))
            call.arguments.append(arguments)

    def set_usage(self, prompt_tokens: object, completion_tokens: object) -> None:
        prompt, completion = token_count(prompt_tokens), token_count(completion_tokens)
        if prompt:  # every request has prompt tokens: a 0 means the provider sent none
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion

    def forget_end(self) -> None:
        """Drop the finish reason and usage seen so far: they were not the provider's last word."""
        self.finish_reason = None
        self.prompt_tokens = self.completion_tokens = None

    @property
    def content(self) -> str:
        return "".join(self._text)

    @property
    def chunks_seen(self) -> bool:
        return bool(self._text or self._calls)

    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=c.id or f"call_{i}", function=FunctionCall(name=c.name, arguments="".join(c.arguments)))
            for i, c in sorted(self._calls.items())
        ]
