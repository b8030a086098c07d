"""The wire contract between the orchestrator and the LLM workers (CONTRACT.md v1).

Importing this package pulls in msgspec and nothing else.
"""

from llm_pool_contracts.messages import (
    CHUNK_LOG_MAX,
    CONTRACT_VERSION,
    DEAD_LETTER_CODES,
    DEFAULT_MAX_JOB_BYTES,
    LANES,
    LEDGER_COUNTERS,
    LEDGER_SEP,
    Chunk,
    Done,
    Error,
    ErrorCode,
    FunctionCall,
    Heartbeat,
    InvalidJob,
    InvalidMessage,
    Job,
    Keys,
    Params,
    Reply,
    Result,
    Terminal,
    ToolCall,
    Usage,
    decode_heartbeat,
    decode_job,
    decode_reply,
    encode,
    is_ident,
    is_terminal,
    readable_request_id,
)

__all__ = [
    "CHUNK_LOG_MAX",
    "CONTRACT_VERSION",
    "DEAD_LETTER_CODES",
    "DEFAULT_MAX_JOB_BYTES",
    "LANES",
    "LEDGER_COUNTERS",
    "LEDGER_SEP",
    "Chunk",
    "Done",
    "Error",
    "ErrorCode",
    "FunctionCall",
    "Heartbeat",
    "InvalidJob",
    "InvalidMessage",
    "Job",
    "Keys",
    "Params",
    "Reply",
    "Result",
    "Terminal",
    "ToolCall",
    "Usage",
    "decode_heartbeat",
    "decode_job",
    "decode_reply",
    "encode",
    "is_ident",
    "is_terminal",
    "readable_request_id",
]


if __name__ != "llm_pool_contracts":  # this folder imported by its old name (from a checkout): be the new package
    from llm_pool_contracts.old_names import stand_in

    stand_in(__name__)
