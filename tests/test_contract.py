"""Holds the ``contracts`` package to CONTRACT.md: its tables, its rules, its examples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import llm_pool_contracts as c

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "docs" / "CONTRACT.md"
SHARED = ROOT.parent / "shared" / "CONTRACT.md"
PAGE = VENDORED.read_text()


def _section(page: str, number: int) -> str:
    match = re.search(rf"^## {number}\..*?(?=^## |\Z)", page, re.S | re.M)
    assert match, f"section {number} not found"
    return match.group(0)


def section(number: int) -> str:
    return _section(PAGE, number)


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:] if rows else rows


def code_names(cell: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", cell)


def fields_of(struct: type[msgspec.Struct]) -> dict[str, bool]:
    """Field name -> required."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: f.required for f in info.fields}


def names_in(page: str) -> set[str]:
    """Every name the page sets in code type: fields, keys, codes, variables."""
    return {n for n in re.findall(r"`([^`\s]+)`", page) if re.fullmatch(r"[A-Za-z_{}:./-]+", n)}


def test_page_only_adds_to_the_v1_baseline() -> None:
    """An orchestrator written against the first v1 page keeps working: every field, key, code and
    variable it names is still here, with the same requiredness, and no new job field is required."""
    if not SHARED.exists():
        pytest.skip("no shared/ folder beside the repository")
    baseline = SHARED.read_text()
    assert names_in(baseline) - names_in(PAGE) == set()
    first = {code_names(r[0])[0]: r[2].startswith("yes") for r in table_rows(_section(baseline, 1))}
    now = {code_names(r[0])[0]: r[2].startswith("yes") for r in table_rows(section(1))}
    assert {k: v for k, v in now.items() if k in first} == first
    assert not any(now[k] for k in set(now) - set(first)), "a new job field must be optional"


def test_job_fields_and_requiredness_follow_section_1() -> None:
    rows = table_rows(section(1))
    page = {code_names(r[0])[0]: r[2].startswith("yes") for r in rows}
    assert fields_of(c.Job) == page


def test_params_keys_follow_section_1() -> None:
    params_row = next(r for r in table_rows(section(1)) if r[0] == "`params`")
    allowed = set(code_names(params_row[3]))
    assert set(fields_of(c.Params)) == allowed


def test_reply_fields_follow_section_2() -> None:
    tables = table_rows(section(2))
    common = {"type", "request_id", "attempt"}
    structs = {"chunk": c.Chunk, "done": c.Done, "result": c.Result, "error": c.Error}
    for row in tables:
        names = code_names(row[0])
        if len(names) != 1 or names[0] not in structs:
            continue
        expected = set(code_names(row[2])) | common
        actual = set(fields_of(structs[names[0]])) | {"type"}
        assert actual == expected, names[0]


def test_error_codes_and_dead_letters_follow_section_2() -> None:
    rows = [r for r in table_rows(section(2)) if len(r) == 4 and r[2] in ("yes", "no") and code_names(r[0])]
    page = {code_names(r[0])[0]: r[2] == "yes" for r in rows}
    assert {code.value for code in c.ErrorCode} == set(page)
    assert {code.value for code in c.DEAD_LETTER_CODES} == {k for k, dead in page.items() if dead}
    assert all(r[3] for r in rows), "every code says whether it is worth retrying"
    failures = [r for r in table_rows(section(2)) if len(r) == 4 and r[2] in ("yes", "no") and not code_names(r[0])]
    assert failures, "the table of what each failure becomes"
    assert {name for r in failures for name in code_names(r[1])} <= {code.value for code in c.ErrorCode}


def test_heartbeat_fields_follow_section_6() -> None:
    text = section(6)
    listed = re.sub(r"\([^)]*\)", "", text.split("JSON:", 1)[1].split(".", 1)[0])
    assert set(fields_of(c.Heartbeat)) == set(code_names(listed))


def test_keys_follow_the_page() -> None:
    keys = c.Keys("llm")
    for name in (keys.jobs, keys.group, keys.dead, keys.cancel, keys.reply("r1"), keys.result("r1"),
                 keys.cancel_flag("r1"), keys.worker("w1")):
        pattern = name.replace("llm", "{p}", 1).replace("r1", "{request_id}").replace("w1", "{consumer}")
        assert re.search(re.escape(pattern) + r"(?![\w:{])", PAGE), pattern


# ---- example messages, as an orchestrator in another language would write them ---------------

EXAMPLE_JOB = {
    "v": 1,
    "request_id": "9b2f3c1e-7a4d-4a8e-9f0a-1c2d3e4f5a6b",
    "tenant_id": "acme",
    "model": "quality",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}],
    "stream": True,
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "params": {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256, "stop": ["\n\n"], "seed": 7,
               "tool_choice": "auto", "response_format": {"type": "text"}},
    "deadline_ms": 1764000000000,
    "trace_id": "unknown fields are ignored",
}
EXAMPLE_REPLIES = [
    {"type": "chunk", "request_id": "r-1", "attempt": 1, "seq": 0, "text": "Hel"},
    {"type": "done", "request_id": "r-1", "attempt": 1, "seq": 2, "content": "Hello",
     "tool_calls": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "estimated": False},
     "model": "quality", "provider_model": "anthropic/claude-sonnet-4-5", "finish_reason": "stop", "cost_usd": 6.6e-05},
    {"type": "result", "request_id": "r-2", "attempt": 2, "content": "",
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}],
     "usage": {"prompt_tokens": 30, "completion_tokens": 9, "estimated": True},
     "model": "fast", "provider_model": "ollama_chat/llama3.2", "finish_reason": "tool_calls", "cost_usd": None},
    {"type": "error", "request_id": "r-3", "attempt": 1, "code": "providers_unavailable", "message": "every deployment failed"},
]


def test_example_job_decodes_with_every_field() -> None:
    job = c.decode_job(json.dumps(EXAMPLE_JOB).encode())
    assert job.request_id == EXAMPLE_JOB["request_id"]
    assert job.stream is True and job.deadline_ms == 1764000000000
    assert job.provider_params()["stop"] == ["\n\n"]
    assert set(job.provider_params()) == set(EXAMPLE_JOB["params"])  # type: ignore[arg-type]


def test_minimal_job_takes_the_defaults() -> None:
    job = c.decode_job(b'{"request_id":"a","tenant_id":"t","model":"fast","messages":[{"role":"user","content":"hi"}]}')
    assert (job.v, job.stream, job.tools, job.params, job.deadline_ms) == (1, False, None, None, None)
    assert job.provider_params() == {}


def test_higher_contract_version_is_served() -> None:
    job = c.decode_job(json.dumps({**EXAMPLE_JOB, "v": 2, "new_field": {"x": 1}}).encode())
    assert job.v == 2


@pytest.mark.parametrize("example", EXAMPLE_REPLIES, ids=lambda e: e["type"])
def test_example_replies_decode_and_encode_back(example: dict[str, object]) -> None:
    raw = json.dumps({**example, "future_field": 1}).encode()
    message = c.decode_reply(raw)
    assert type(message).__name__.lower() == example["type"]
    assert json.loads(c.encode(message)) == example


def test_heartbeat_round_trips() -> None:
    v1 = {"consumer": "h-1-abc", "host": "h", "pid": 1, "version": "0.1.0", "started_at_ms": 1,
          "heartbeat_at_ms": 2, "in_flight": 3, "completed": 4, "failed": 5}
    beat = {**v1, "unwritten": 2, "writes_refused_since_ms": 3}
    assert json.loads(c.encode(c.decode_heartbeat(json.dumps(beat)))) == beat
    first = c.decode_heartbeat(json.dumps(v1))  # a first-v1 heartbeat still reads, with the added fields' defaults
    assert (first.unwritten, first.writes_refused_since_ms) == (0, None)


def test_a_reply_without_its_type_is_refused() -> None:
    with pytest.raises(c.InvalidMessage):
        c.decode_reply(b'{"request_id":"r","attempt":1,"seq":0,"text":"x"}')


# ---- invalid jobs: each rule of §1 ---------------------------------------------------------

VALID = {"request_id": "req-1", "tenant_id": "t1", "model": "fast", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("change", "readable_id"),
    [
        ({"request_id": "has space"}, False),
        ({"request_id": ""}, False),
        ({"request_id": "x" * 129}, False),
        ({"request_id": 12}, False),
        ({"request_id": "nl-1\n"}, False),
        ({"request_id": "x" * 128 + "\n"}, False),
        ({"tenant_id": "t1\n"}, True),
        ({"deadline_ms": 60000.5}, True),
        ({"tools": [1]}, True),
        ({"stream": None}, True),
        ({"model": None}, True),
        ({"tenant_id": "t/1"}, True),
        ({"tenant_id": None}, True),
        ({"model": ""}, True),
        ({"model": 3}, True),
        ({"messages": []}, True),
        ({"messages": "hi"}, True),
        ({"messages": [{"content": "no role"}]}, True),
        ({"messages": [{"role": 1}]}, True),
        ({"messages": ["not an object"]}, True),
        ({"stream": "yes"}, True),
        ({"tools": {"not": "a list"}}, True),
        ({"params": {"temperature": 0.1, "logit_bias": {}}}, True),
        ({"params": {"max_tokens": "many"}}, True),
        ({"params": []}, True),
        ({"deadline_ms": "soon"}, True),
        ({"v": "one"}, True),
    ],
)
def test_each_broken_rule_makes_the_job_invalid(change: dict[str, object], readable_id: bool) -> None:
    with pytest.raises(c.InvalidJob) as caught:
        c.decode_job(json.dumps({**VALID, **change}).encode())
    assert caught.value.request_id == ("req-1" if readable_id else None)
    assert caught.value.reason


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[1,2]", b'"str"', b"\xff\xfe\x00", b"{", b"null"])
def test_garbage_is_invalid_without_a_request_id(raw: bytes | None) -> None:
    with pytest.raises(c.InvalidJob) as caught:
        c.decode_job(raw)
    assert caught.value.request_id is None


def test_missing_fields_are_named() -> None:
    for field in ("request_id", "tenant_id", "model", "messages"):
        body = {k: v for k, v in VALID.items() if k != field}
        with pytest.raises(c.InvalidJob, match=field):
            c.decode_job(json.dumps(body).encode())


@pytest.mark.parametrize("raw", [b'"deadline_ms": 1e0', b'"v": 1e0'])
def test_integers_must_be_json_integers(raw: bytes) -> None:
    body = json.dumps(VALID).encode()[:-1] + b", " + raw + b"}"
    with pytest.raises(c.InvalidJob):
        c.decode_job(body)


def test_null_is_accepted_where_the_page_says() -> None:
    job = c.decode_job(json.dumps({**VALID, "tools": None, "params": {"temperature": None}, "deadline_ms": None}).encode())
    assert job.tools is None and job.deadline_ms is None and job.provider_params() == {}


def test_size_limit_counts_raw_bytes() -> None:
    body = json.dumps({**VALID, "messages": [{"role": "user", "content": "é" * 600}]}).encode()
    c.decode_job(body, max_bytes=len(body))
    with pytest.raises(c.InvalidJob, match="over the limit") as caught:
        c.decode_job(body, max_bytes=len(body) - 1)
    assert caught.value.request_id == "req-1"


def test_contracts_imports_only_msgspec() -> None:
    code = (
        "import sys; before = set(sys.modules); import llm_pool_contracts; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(' '.join(sorted(new - set(sys.stdlib_module_names))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert set(out.stdout.split()) <= {"llm_pool_contracts", "msgspec", "typing_extensions"}  # the last is msgspec's own


def test_the_client_imports_neither_litellm_nor_the_worker() -> None:
    code = "import sys, llm_pool_client; print([m in sys.modules for m in ('litellm', 'openai', 'llm_pool_worker')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[False, False, False]"


def test_the_old_client_import_still_works_with_a_warning() -> None:
    code = "import warnings; warnings.simplefilter('error'); import llm_pool_worker.client"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert "DeprecationWarning" in out.stderr and "client" in out.stderr
