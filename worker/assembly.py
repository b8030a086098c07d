"""Builds one answer out of streamed deltas: text, tool-call fragments, finish reason, usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import FunctionCall, ToolCall, Usage


@dataclass(slots=True)
class Completion:
    """A provider's whole answer, in the terms of the wire contract."""

    content: str
    tool_calls: list[ToolCall]
    usage: Usage
    provider_model: str
    finish_reason: str
    cost_usd: float | None


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamAssembler:
    """Collects deltas as they arrive, keeping only what the final message needs."""

    __slots__ = ("_calls", "_text", "completion_tokens", "finish_reason", "prompt_tokens")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def add_text(self, text: str) -> None:
        self._text.append(text)

    def add_tool_fragment(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _PartialCall()
        if call_id:
            call.id = call_id
        if name:
            call.name += name
        if arguments:
            call.arguments.append(arguments)

    def set_usage(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        if prompt_tokens:  # every request has prompt tokens: a 0 means the provider sent none
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens

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
