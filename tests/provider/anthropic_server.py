"""A local Anthropic Messages API server for tests (aiohttp, 127.0.0.1 only): ``POST /v1/messages``.

It enforces its limits the way Anthropic's "Rate limits" page describes them: requests, input
tokens and output tokens per minute, each a token bucket refilled continuously at ``limit / 60``
per second, of capacity ``burst_*`` (default a minute's worth; the page warns that a minute's
limit may be enforced in finer slices, "60 RPM as 1 request per second").

Charging follows the same page: the input tokens are charged when the request is admitted;
output tokens are "estimated based on max_tokens at the beginning of each request, and the
estimate is adjusted at the end of the request to reflect the actual number of output tokens
used", so ``max_tokens`` is reserved at admission and what the answer did not use returns to the
bucket when it is sent (all of it when the answer is an injected failure).

A request that does not fit every bucket is answered 429 (``rate_limit_error``) with
``retry-after`` in whole seconds, rounded up, as Anthropic sends it. Every response carries
``anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`` and the
combined ``anthropic-ratelimit-tokens-*`` (input plus output, as Anthropic's responses show);
a reset is the RFC 3339 instant (rounded up to the second) at which that bucket is full again.
One simplification: Anthropic rounds the token figures to the nearest thousand; they are exact here.

Input tokens are counted as characters / 4 of the text (system, message text, tool results,
rounded up), plus 3 per message and 1,500 per image; a reply uses ``output_tokens`` (at most
``max_tokens``). Per-request behaviour is keyed by the text of the last message: ``script`` (the
answers of the first attempts, in order: an HTTP status, or ``"not-json"``, ``"no-content"``,
``"error-object"`` for a malformed 200), ``status_for`` (always that status, before admission,
as a request the API refuses), ``slow`` (the first attempt waits that long), ``headers_for``
(extra headers on every answer). ``fail_rate``, ``overload_rate`` and ``malformed_rate`` inject
500s, 529s and malformed 200s at random (seeded).

What it saw is in the counters (read them after the calls finished): ``calls``, ``bodies`` (the
last request's JSON) and ``successes`` per key, ``statuses``, ``usage`` (input, output of the
last success per key), ``rate_limited`` (the 429s, per dimension that lacked room) and
`AnthropicServer.peak`, the most admitted in any window of a dimension.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .server import BackgroundServer, _Bucket, _sse

DIMENSIONS = ("requests", "input_tokens", "output_tokens")
MALFORMED = ("not-json", "no-content", "error-object")
IMAGE_TOKENS = 1_500
# Anthropic's error type for each status (its "Errors" page); other statuses are api_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass
class AnthropicConfig:
    rpm: float = 60_000.0
    itpm: float = 10_000_000.0
    otpm: float = 10_000_000.0
    burst_requests: float | None = None  # default: rpm
    burst_input_tokens: float | None = None  # default: itpm
    burst_output_tokens: float | None = None  # default: otpm
    output_tokens: int = 20  # tokens a reply uses, at most max_tokens
    latency: float = 0.0
    fail_rate: float = 0.0
    overload_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 0
    script: dict[str, list[int | str]] = field(default_factory=dict)
    status_for: dict[str, int] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    headers_for: dict[str, dict[str, str]] = field(default_factory=dict)


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            _text_of(block.get("text") if block.get("type") == "text" else block.get("content"))
            for block in content
            if isinstance(block, dict)
        )
    return ""


def _images_in(content: object) -> int:
    if not isinstance(content, list):
        return 0
    return sum(
        1 if block.get("type") == "image" else _images_in(block.get("content"))
        for block in content
        if isinstance(block, dict)
    )


def input_tokens(body: dict[str, Any]) -> int:
    """The input tokens the server charges and reports for a request body."""
    messages = [message for message in body.get("messages") or [] if isinstance(message, dict)]
    text = _text_of(body.get("system")) + "".join(_text_of(message.get("content")) for message in messages)
    images = sum(_images_in(message.get("content")) for message in messages)
    return -(-len(text) // 4) + 3 * len(messages) + IMAGE_TOKENS * images


def _key(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    return _text_of(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""


def _instant(seconds_from_now: float) -> str:
    """RFC 3339, UTC, rounded up to the second: never earlier than the bucket is full."""
    moment = datetime.fromtimestamp(math.ceil(time.time() + seconds_from_now), tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _message_events(answer: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """A streamed message as Anthropic sends it: message_start (the input usage), the text block,
    message_delta (the output usage) and message_stop."""
    usage = answer["usage"]
    start = answer | {"content": [], "stop_reason": None, "usage": usage | {"output_tokens": 1}}
    text = answer["content"][0]["text"]
    return [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


class AnthropicServer(BackgroundServer):
    """The server and what it saw. ``base_url`` is what ``AsyncAnthropic(base_url=...)`` takes."""

    def __init__(self, config: AnthropicConfig | None = None) -> None:
        super().__init__()
        self.config = config or AnthropicConfig()
        self.calls: Counter[str] = Counter()  # every request, by key
        self.successes: Counter[str] = Counter()  # well-formed 200 answers, by key
        self.statuses: Counter[int] = Counter()
        self.malformed: Counter[str] = Counter()  # malformed 200 answers, by kind
        self.usage: dict[str, tuple[int, int]] = {}  # (input, output) of the last success, by key
        self.bodies: dict[str, Any] = {}  # the JSON of the last request, by key
        self.rate_limited: Counter[str] = Counter()  # 429s, by dimension that lacked room
        self.rate_limited_at: list[float] = []  # server time of each 429 answer
        self._events: dict[str, list[tuple[float, float]]] = {name: [] for name in DIMENSIONS}
        self._buckets: dict[str, _Bucket] | None = None
        self._rng = random.Random(self.config.seed)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self, **changes: Any) -> None:
        """Changes the configuration and starts the buckets full again."""
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self.config, name):
                    raise AttributeError(f"AnthropicConfig has no {name!r}")
                setattr(self.config, name, value)
            self._buckets = None
            self._rng = random.Random(self.config.seed)
            self.started_at = time.monotonic()

    def limit(self, dimension: str) -> float:
        """The configured per-minute limit of a dimension."""
        return {
            "requests": self.config.rpm,
            "input_tokens": self.config.itpm,
            "output_tokens": self.config.otpm,
        }[dimension]

    def peak(self, dimension: str, window: float = 60.0) -> float:
        """The most of ``dimension`` used in any ``window`` seconds: requests and input tokens
        when admitted, output tokens when generated (the answer sent)."""
        with self._lock:
            events = sorted(self._events[dimension])
        times = [at for at, _ in events]
        running = [0.0]
        for _, amount in events:
            running.append(running[-1] + amount)
        best = 0.0
        for end in range(len(events)):
            start = bisect_left(times, times[end] - window + 1e-9)
            best = max(best, running[end + 1] - running[start])
        return best

    # -- the books (under the lock) --------------------------------------------------------------
    def _limits(self, now: float) -> dict[str, _Bucket]:
        if self._buckets is None:
            config = self.config
            self._buckets = {
                "requests": _Bucket(config.burst_requests or config.rpm, config.rpm / 60.0, now),
                "input_tokens": _Bucket(config.burst_input_tokens or config.itpm, config.itpm / 60.0, now),
                "output_tokens": _Bucket(config.burst_output_tokens or config.otpm, config.otpm / 60.0, now),
            }
        for bucket in self._buckets.values():
            bucket.refill(now)
        return self._buckets

    def _headers(self, now: float) -> dict[str, str]:
        buckets = self._limits(now)
        headers: dict[str, str] = {}
        for dimension, prefix in zip(DIMENSIONS, ("requests", "input-tokens", "output-tokens"), strict=True):
            bucket = buckets[dimension]
            headers[f"anthropic-ratelimit-{prefix}-limit"] = str(int(self.limit(dimension)))
            headers[f"anthropic-ratelimit-{prefix}-remaining"] = str(max(0, math.floor(bucket.level)))
            headers[f"anthropic-ratelimit-{prefix}-reset"] = _instant(bucket.until_full())
        tokens = (buckets["input_tokens"], buckets["output_tokens"])
        headers["anthropic-ratelimit-tokens-limit"] = str(int(self.config.itpm + self.config.otpm))
        headers["anthropic-ratelimit-tokens-remaining"] = str(
            sum(max(0, math.floor(b.level)) for b in tokens)
        )
        headers["anthropic-ratelimit-tokens-reset"] = _instant(max(b.until_full() for b in tokens))
        return headers

    def _headers_now(self, key: str) -> dict[str, str]:
        with self._lock:
            headers = self._headers(time.monotonic())
        return {
            **headers,
            "request-id": f"req_{random.getrandbits(48):012x}",
            **self.config.headers_for.get(key, {}),
        }

    def _finish(self, status: int, response: web.Response) -> web.Response:
        with self._lock:
            self.statuses[status] += 1
        return response

    def _error(
        self, status: int, message: str, key: str, extra: dict[str, str] | None = None
    ) -> web.Response:
        body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
        headers = {**self._headers_now(key), **(extra or {})}
        return self._finish(status, web.json_response(body, status=status, headers=headers))

    # -- the endpoint ------------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON", "")
        key = _key(body)
        config = self.config
        max_tokens = body.get("max_tokens")
        if key in config.status_for:
            with self._lock:
                self.calls[key] += 1
                self.bodies[key] = body
            return self._error(config.status_for[key], f"refused {key}", key)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return self._error(400, "max_tokens: field required", key)
        charge = {
            "requests": 1.0,
            "input_tokens": float(input_tokens(body)),
            "output_tokens": float(max_tokens),
        }
        with self._lock:
            now = time.monotonic()
            self.calls[key] += 1
            self.bodies[key] = body
            attempt = self.calls[key]
            buckets = self._limits(now)
            waits = {name: buckets[name].wait_for(amount) for name, amount in charge.items()}
            if not any(wait > 0 for wait in waits.values()):
                for name, amount in charge.items():
                    buckets[name].level -= amount
                self._events["requests"].append((now, 1.0))
                self._events["input_tokens"].append((now, charge["input_tokens"]))
            else:
                for name, wait in waits.items():
                    if wait > 0:
                        self.rate_limited[name] += 1
                self.rate_limited_at.append(now - self.started_at)
            scripted = config.script.get(key, [])
            planned: int | str | None = scripted[attempt - 1] if attempt <= len(scripted) else None
            draw = self._rng.random()
        wait = max(waits.values())
        if math.isinf(wait):  # larger than a bucket's capacity: it can never be admitted
            return self._error(400, f"request exceeds your {max(waits, key=waits.__getitem__)} limit", key)
        if wait > 0:
            return self._error(429, "rate limit exceeded", key, {"retry-after": str(max(1, math.ceil(wait)))})
        delay = config.latency + (config.slow.get(key, 0.0) if attempt == 1 else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if planned is None:
            if draw < config.fail_rate:
                planned = 500
            elif draw < config.fail_rate + config.overload_rate:
                planned = 529
            elif draw < config.fail_rate + config.overload_rate + config.malformed_rate:
                planned = MALFORMED[attempt % len(MALFORMED)]
        output = 0 if planned is not None else min(max_tokens, config.output_tokens)
        with self._lock:  # the reservation is corrected to what was generated
            bucket = self._limits(time.monotonic())["output_tokens"]
            bucket.level = min(bucket.capacity, bucket.level + max_tokens - output)
            if output:
                self._events["output_tokens"].append((time.monotonic(), float(output)))
        if isinstance(planned, int):
            return self._error(planned, f"injected {planned}", key)
        if planned is not None:
            return self._malformed(planned, key)
        prompt = int(charge["input_tokens"])
        with self._lock:
            self.successes[key] += 1
            self.usage[key] = (prompt, output)
        answer = {
            "id": f"msg_{attempt:04d}_{abs(hash(key)) % 10**8:08d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-test"),
            "content": [{"type": "text", "text": f"echo: {key}"}],
            "stop_reason": "max_tokens" if output == max_tokens else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt,
                "output_tokens": output,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        if body.get("stream"):
            return self._finish(200, _sse(_message_events(answer), self._headers_now(key), done=False))
        return self._finish(200, web.json_response(answer, headers=self._headers_now(key)))

    def _malformed(self, kind: str, key: str) -> web.Response:
        with self._lock:
            self.malformed[kind] += 1
        headers = self._headers_now(key)
        if kind == "not-json":
            response = web.Response(
                text="<html>upstream hiccup</html>", content_type="text/html", headers=headers
            )
        elif kind == "no-content":
            body = {"id": "msg_x", "type": "message", "role": "assistant", "model": "claude-test"}
            response = web.json_response(body, headers=headers)
        elif kind == "error-object":
            body = {
                "type": "error",
                "error": {"type": "api_error", "message": "internal error, answered 200"},
            }
            response = web.json_response(body, headers=headers)
        else:
            raise ValueError(f"unknown malformed kind {kind!r}")
        return self._finish(200, response)

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
