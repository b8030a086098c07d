"""The wire types of CONTRACT.md, as msgspec structs.

Decoding is strict where the contract says a job is invalid and lenient where it says
unknown fields are ignored, so that either side can add optional fields.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Final

import msgspec

CONTRACT_VERSION: Final = 1
DEFAULT_MAX_JOB_BYTES: Final = 1024 * 1024

# \A and \Z: `$` would also match before a final newline, and "id\n" would pass
ID_PATTERN: Final = r"\A[A-Za-z0-9._:-]{1,128}\Z"
_ID_RE: Final = re.compile(ID_PATTERN)

Ident = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


def is_ident(value: object) -> bool:
    """Whether ``value`` may be a ``request_id`` or ``tenant_id`` (CONTRACT.md §1)."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


class ErrorCode(StrEnum):
    INVALID_JOB = "invalid_job"
    UNKNOWN_MODEL = "unknown_model"
    BAD_REQUEST = "bad_request"
    PROVIDER_AUTH = "provider_auth"  # added after the first v1 page, as are the two below
    RATE_LIMITED = "rate_limited"
    ANSWER_TOO_LARGE = "answer_too_large"
    PROVIDERS_UNAVAILABLE = "providers_unavailable"
    INTERRUPTED = "interrupted"
    EXPIRED = "expired"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    INTERNAL = "internal"
    QUOTA_EXCEEDED = "quota_exceeded"  # added after the first v1 page


#: Codes whose jobs also go to the dead-letter stream (CONTRACT.md §2).
DEAD_LETTER_CODES: Final = frozenset({ErrorCode.INVALID_JOB, ErrorCode.TOO_MANY_ATTEMPTS})


class InvalidJob(ValueError):
    """A job entry breaks CONTRACT.md §1; ``request_id`` is set when it could still be read."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class InvalidMessage(ValueError):
    """A reply or heartbeat payload is not a valid contract message."""


# ---- §1 jobs --------------------------------------------------------------------------------


class Params(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Generation options passed through to the provider; any other key is refused."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class Job(msgspec.Struct, omit_defaults=True):
    request_id: Ident
    tenant_id: Ident
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
    v: int = CONTRACT_VERSION
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    params: Params | None = None
    deadline_ms: int | None = None
    resumable: bool = False  # added after the first v1 page: replies also kept in {p}:chunks:{request_id}

    def __post_init__(self) -> None:
        for i, message in enumerate(self.messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{i}] has no string `role`")
            if not _is_content(message.get("content")):
                raise ValueError(f"messages[{i}].content must be a string, null, or a list of parts (objects with a string `type`)")
        for i, tool in enumerate(self.tools or ()):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": <string>, ...}}}}')

    def provider_params(self) -> dict[str, Any]:
        """The ``params`` that were set, as keyword arguments for the provider call."""
        if self.params is None:
            return {}
        return {k: v for k, v in msgspec.structs.asdict(self.params).items() if v is not None}


def _is_content(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)


# ---- §2 replies -----------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class Chunk(msgspec.Struct, tag_field="type", tag="chunk"):
    request_id: str
    attempt: int
    seq: int
    text: str


class _Answer(msgspec.Struct, omit_defaults=True):
    request_id: str
    attempt: int
    content: str
    tool_calls: list[ToolCall]
    usage: Usage
    model: str
    provider_model: str
    finish_reason: str
    cost_usd: float | None
    tenant_id: str | None = None  # added after the first v1 page: whose answer it is


class Result(_Answer, tag_field="type", tag="result"):
    """The only message of a non-streamed job."""


class Done(_Answer, tag_field="type", tag="done", kw_only=True):
    """The last message of a streamed job; ``seq`` is the number of chunks of its attempt."""

    seq: int


class Error(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    request_id: str
    attempt: int
    code: str
    message: str
    tenant_id: str | None = None  # added after the first v1 page; absent when the job's tenant is unknown


Reply = Chunk | Done | Result | Error
Terminal = Done | Result | Error


# ---- §6 liveness ----------------------------------------------------------------------------


class Heartbeat(msgspec.Struct):
    consumer: str
    host: str
    pid: int
    version: str
    started_at_ms: int
    heartbeat_at_ms: int
    in_flight: int
    completed: int
    failed: int
    # added after v1: outcomes finished but not yet taken by Redis, and since when Redis refuses them
    unwritten: int = 0
    writes_refused_since_ms: int | None = None


# ---- encoding -------------------------------------------------------------------------------

_encoder: Final = msgspec.json.Encoder()
_job_decoder: Final = msgspec.json.Decoder(Job)
_reply_decoder: Final[msgspec.json.Decoder[Reply]] = msgspec.json.Decoder(Reply)
_heartbeat_decoder: Final = msgspec.json.Decoder(Heartbeat)


class _RequestIdOnly(msgspec.Struct):
    request_id: Any = None


_request_id_decoder: Final = msgspec.json.Decoder(_RequestIdOnly)


def encode(message: Job | Reply | Heartbeat) -> bytes:
    return _encoder.encode(message)


_BOM: Final = b"\xef\xbb\xbf"
_LONE_SURROGATE: Final = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _as_bytes(raw: bytes | str) -> bytes:
    return raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw


def _mended(data: bytes) -> bytes:
    """The job with what keeps it from decoding at all replaced, to read its request_id."""
    data = data.removeprefix(_BOM)
    data = data.decode("utf-8", "replace").encode()
    return _LONE_SURROGATE.sub(rb"\\ufffd", data)


def _top_level_request_id(data: bytes) -> Any:
    """The top-level ``request_id`` of a job too deeply nested to decode, by a linear scan of its tokens."""
    depth, key, after_colon = 0, None, False
    for match in _TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
        elif token in (b"}", b"]"):
            depth -= 1
        elif depth != 1:
            continue
        elif token == b":":
            after_colon = True
        elif token == b",":
            key, after_colon = None, False
        elif after_colon:
            return msgspec.json.decode(token) if key == b'"request_id"' else None
        else:
            key = token
    return None


def readable_request_id(raw: bytes | str) -> str | None:
    """The job's ``request_id`` if it can be read and is valid, so that the sender can be told."""
    data = _as_bytes(raw)
    rid: Any = None
    try:
        rid = _request_id_decoder.decode(data).request_id
    except RecursionError:
        rid = _top_level_request_id(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        try:
            rid = _request_id_decoder.decode(_mended(data)).request_id
        except (msgspec.DecodeError, RecursionError):
            rid = _top_level_request_id(_mended(data))
    return rid if is_ident(rid) else None


def _why_not_decoded(data: bytes, exc: Exception) -> str:
    """A true account of why the job could not be decoded."""
    if isinstance(exc, RecursionError):
        return "the job nests deeper than the decoder allows"
    if data.startswith(_BOM):
        return "the job starts with a byte order mark, which JSON does not allow"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"the job is not valid UTF-8 (byte 0x{data[bad.start]:02x} at offset {bad.start})"
    surrogate = _LONE_SURROGATE.search(data)
    if surrogate is not None:
        return f"the job contains a lone UTF-16 surrogate escape ({surrogate.group().decode()}), which is not a character"
    return f"the job is not JSON: {exc}"


def decode_job(raw: bytes | str | None, max_bytes: int = DEFAULT_MAX_JOB_BYTES) -> Job:
    """Decode the ``job`` field of a stream entry, or raise :class:`InvalidJob`; nothing else."""
    if raw is None:
        raise InvalidJob("the entry has no `job` field")
    data = _as_bytes(raw)
    if len(data) > max_bytes:
        raise InvalidJob(f"the job is {len(data)} bytes, over the limit of {max_bytes}", readable_request_id(data))
    try:
        return _job_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidJob(str(exc), readable_request_id(data)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidJob(_why_not_decoded(data, exc), readable_request_id(data)) from None


def decode_reply(raw: bytes | str) -> Reply:
    try:
        return _reply_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidMessage(str(exc)) from None


def decode_heartbeat(raw: bytes | str) -> Heartbeat:
    try:
        return _heartbeat_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidMessage(str(exc)) from None


def is_terminal(message: Reply) -> bool:
    return not isinstance(message, Chunk)


# ---- keys -----------------------------------------------------------------------------------


#: The most entries a resumable job's reply stream keeps (approximately, as XADD MAXLEN ~ does).
CHUNK_LOG_MAX: Final = 10_000

#: The lanes of §1, most urgent first.
LANES: Final = ("interactive", "batch")


class Keys:
    """Redis names of CONTRACT.md for one key prefix."""

    def __init__(self, prefix: str = "llm") -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:jobs"
        self.batch = f"{prefix}:jobs:batch"
        self.lanes_config = f"{prefix}:lanes"
        self.group = f"{prefix}:workers"
        self.dead = f"{prefix}:jobs:dead"
        self.cancel = f"{prefix}:cancel"

    def lane(self, name: str) -> str:
        """The stream of a lane (§1): ``interactive`` (the default, ``{p}:jobs``) or ``batch``."""
        if name not in LANES:
            raise ValueError(f"unknown lane {name!r}: one of {', '.join(LANES)}")
        return self.batch if name == "batch" else self.jobs

    def lanes(self) -> tuple[str, str]:
        return self.jobs, self.batch

    # the waiting room of §1 (tenants): workers' own keys, never an orchestrator's

    def run(self, lane: str) -> str:
        """The stream a lane's jobs run from once taken from the waiting room."""
        return f"{self.prefix}:run:{lane}"

    def wait(self, lane: str, tenant_id: str) -> str:
        return f"{self.prefix}:wait:{lane}:{tenant_id}"

    def waiting(self, lane: str) -> str:
        return f"{self.prefix}:waiting:{lane}"

    def tenant(self, tenant_id: str) -> str:
        """The prefix of a tenant's counters: ``…:running``, ``…:rpm:{minute}``, ``…:tpm:{minute}``."""
        return f"{self.prefix}:tenant:{tenant_id}:"

    @property
    def tenant_limits(self) -> str:
        return f"{self.prefix}:tenant-limits"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    def chunks(self, request_id: str) -> str:
        """A resumable job's replies, kept as a stream (§2, resumable streams)."""
        return f"{self.prefix}:chunks:{request_id}"

    def cancel_flag(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    def usage(self, tenant_id: str, day: str) -> str:
        """The usage ledger of one tenant for one UTC day (``YYYY-MM-DD``), a hash (§8)."""
        return f"{self.prefix}:usage:{tenant_id}:{day}"

    # the HTTP gateway's own keys (§10)

    @property
    def api_keys(self) -> str:
        """A hash: SHA-256 (hex) of an API key → the tenant it acts for."""
        return f"{self.prefix}:api-keys"

    def owner(self, request_id: str) -> str:
        """The tenant that started a resumable job through the gateway, so that only it re-attaches."""
        return f"{self.prefix}:owner:{request_id}"


# ---- §8 usage ledger ------------------------------------------------------------------------

#: Between a model group and a counter in a ledger field: ``<group>|<counter>``.
LEDGER_SEP: Final = "|"
#: Counters of a ledger hash; errors count as ``error:<code>``, cost in billionths of a dollar.
LEDGER_COUNTERS: Final = ("requests", "prompt_tokens", "completion_tokens", "estimated", "cost_nano_usd", "unpriced")

