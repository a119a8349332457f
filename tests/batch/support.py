"""Running ``llmqd batch`` as a subprocess against the local fake providers, in every pairing of
provider and file format, and reading its results independently of the code under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer

ENDPOINTS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MODELS = {"openai": "test-model", "anthropic": "claude-test"}

# Runs llmqd with a cap on the size of any file it writes (RLIMIT_FSIZE): a write past it fails
# with EFBIG after writing what fits, as a disk filling up mid-line does. (CPython ignores
# SIGXFSZ, so the process is not killed.)
FILE_SIZE_CAPPED = (
    "import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap)); sys.argv[0] = 'llmqd'; "
    "runpy.run_module('llm_queue_dispatcher.cli', run_name='__main__')"
)


@dataclass
class Fake:
    """One fake provider, with the few behaviours the batch tests ask of either."""

    provider: str  # "openai" or "anthropic"
    server: ProviderServer | AnthropicServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def calls(self) -> Counter[str]:
        return self.server.calls

    @property
    def successes(self) -> Counter[str]:
        return self.server.successes

    @property
    def statuses(self) -> Counter[int]:
        return self.server.statuses

    def tokens_used(self, key: str) -> int:
        """The tokens the last answer to ``key`` reported (input and output together)."""
        usage = self.server.usage[key]
        return sum(usage) if isinstance(usage, tuple) else usage

    def fail(self, fail_first: dict[str, int] | None = None, refuse: dict[str, int] | None = None) -> None:
        """Answers 500 to the first ``fail_first[key]`` calls of each key, and always
        ``refuse[key]`` (a 4xx) to those keys; an empty call clears both."""
        if isinstance(self.server, AnthropicServer):
            script: dict[str, list[int | str]] = {key: [500] * n for key, n in (fail_first or {}).items()}
            self.server.configure(script=script, status_for=dict(refuse or {}))
        else:
            self.server.configure(fail_first=dict(fail_first or {}), status_for=dict(refuse or {}))


@dataclass(frozen=True)
class Case:
    """A provider and a file format."""

    provider: str
    format: str

    def line(self, request_id: str, **call: Any) -> dict[str, Any]:
        """The input line asking the provider to echo ``request_id``."""
        body = {"messages": [{"role": "user", "content": request_id}], **call}
        if self.format == "native":
            return {"id": request_id, **body}
        if self.format == "batch-api":
            return {"custom_id": request_id, "method": "POST", "url": ENDPOINTS[self.provider], "body": body}
        return {"custom_id": request_id, "params": body}


CASES = [
    Case("openai", "native"),
    Case("openai", "batch-api"),
    Case("anthropic", "native"),
    Case("anthropic", "batch-api"),
    Case("anthropic", "message-batches"),
]


#: One pairing per output format and per provider, for the behaviours the format reaches only
#: when it writes (the same code reads every format).
WRITING_CASES = [
    Case("openai", "native"),
    Case("anthropic", "batch-api"),
    Case("anthropic", "message-batches"),
]
#: Every format with each provider once.
RESUMING_CASES = [case for case in CASES if case != Case("anthropic", "native")]


def case_id(case: Case) -> str:
    return f"{case.provider}-{case.format}"


def write_requests(
    path: Path, count: int, case: Case = CASES[0], *, max_tokens: int = 50, start: int = 0
) -> list[str]:
    ids = [f"q{n:03d}" for n in range(start, start + count)]
    with path.open("a") as handle:
        for request_id in ids:
            handle.write(json.dumps(case.line(request_id, max_tokens=max_tokens)) + "\n")
    return ids


def command(
    fake: Fake, requests: Path | str, out: Path | str, *options: str, file_size_cap: int | None = None
) -> list[str]:
    start = ["-m", "llm_queue_dispatcher.cli"]
    if file_size_cap is not None:
        start = ["-c", FILE_SIZE_CAPPED, str(file_size_cap)]
    return [
        sys.executable,
        *start,
        "batch",
        str(requests),
        "--out",
        str(out),
        "--provider",
        fake.provider,
        "--base-url",
        fake.base_url,
        "--model",
        MODELS[fake.provider],
        "--progress",
        "none",
        *options,
    ]


def environment(**changes: str) -> dict[str, str]:
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "ANTHROPIC_API_KEY": "test-key"}
    for name in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        env.pop(name, None)
    return {**env, **changes}


def run_cli(
    fake: Fake,
    requests: Path | str,
    out: Path | str,
    *options: str,
    stdin: str | None = None,
    file_size_cap: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(fake, requests, out, *options, file_size_cap=file_size_cap),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment() if env is None else env,
        input=stdin,
    )


def results(out: Path) -> list[dict[str, Any]]:
    # Strict UTF-8, split on "\n" only (a response may hold U+2028).
    return [json.loads(line) for line in out.read_bytes().decode("utf-8").split("\n") if line]


@dataclass(frozen=True)
class Outcome:
    """One result line, whatever its format: the id, whether it is an answer, the provider's
    JSON answer, and for a failure its HTTP status or error code."""

    id: str
    ok: bool
    response: Any
    failure: Any


def outcome(line: dict[str, Any]) -> Outcome:
    """Reads a result line of any of the three formats, as their documentation describes them."""
    if "status" in line:  # native
        error = line.get("error") or {}
        return Outcome(line["id"], line["status"] == "ok", line.get("response"), error.get("status_code"))
    if "result" in line:  # Anthropic's Message Batches results
        result = line["result"]
        if result["type"] == "succeeded":
            return Outcome(line["custom_id"], True, result["message"], None)
        return Outcome(line["custom_id"], False, None, result["error"]["error"]["type"])
    response = line["response"]  # the OpenAI Batch API's output
    if response is None:
        return Outcome(line["custom_id"], False, None, line["error"]["code"])
    ok = 200 <= response["status_code"] < 300 and line["error"] is None
    return Outcome(
        line["custom_id"], ok, response["body"] if ok else None, None if ok else response["status_code"]
    )


def outcomes(out: Path) -> list[Outcome]:
    return [outcome(line) for line in results(out)]


def last_outcomes(out: Path) -> dict[str, Outcome]:
    """The result of each id: its last line."""
    return {result.id: result for result in outcomes(out)}


def answer_text(response: Any) -> str:
    """The assistant's text of a chat completion or of a message."""
    if "choices" in response:
        return str(response["choices"][0]["message"]["content"])
    return "".join(block["text"] for block in response["content"] if block["type"] == "text")
