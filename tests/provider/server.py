"""A local OpenAI-compatible chat completions server for tests (aiohttp, 127.0.0.1 only).

It enforces its own limits the way a provider does: a request bucket and a token bucket, each
refilled continuously at ``rpm / 60`` and ``tpm / 60`` per second, with capacities
``burst_requests`` and ``burst_tokens`` (a provider enforces a minute's limit in finer slices).
A request is charged its prompt (characters / 4, rounded up) plus its ``max_tokens`` (or
``max_completion_tokens``, or 256) on arrival; unused completion tokens are not refunded, as
OpenAI does not. Over the limits it answers 429 with ``retry-after``, ``retry-after-ms`` and
the ``x-ratelimit-*`` headers, which every response carries.

Per-request behaviour is keyed by the content of the request's last message: ``fail_first``
(answer 500 that many times first), ``drop_first`` (close the connection without an answer
that many times first), ``status_for`` (always answer that status), ``quota`` (429 with code
``insufficient_quota``), ``slow`` (the first call waits that long), ``body_for`` (answer 200
with this body and content type instead of a completion), ``stream`` (server-sent chunks, the
usage last when ``stream_options.include_usage``), ``content_for`` (the assistant's
text, which may hold anything JSON can escape, a lone surrogate included), ``headers_for``
(headers added to every answer, an error's included). Every answer carries an ``x-request-id``.
``latency`` delays
every answer; ``fail_rate`` fails that share of calls with 500 (seeded).

Run in a background thread with its own event loop (`ProviderServer.start` / `stop`), so both
async tests and subprocesses can call it. `BackgroundServer` is that lifecycle, shared with the
Anthropic server (`tests/provider/anthropic_server.py`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

DEFAULT_MAX_TOKENS = 256


@dataclass
class ProviderConfig:
    rpm: float = 60_000.0
    tpm: float = 10_000_000.0
    burst_requests: float | None = None  # default: rpm
    burst_tokens: float | None = None  # default: tpm
    completion_tokens: int = 20  # tokens a reply uses, at most max_tokens
    latency: float = 0.0
    fail_rate: float = 0.0
    seed: int = 0
    fail_first: dict[str, int] = field(default_factory=dict)
    status_for: dict[str, int] = field(default_factory=dict)
    quota: set[str] = field(default_factory=set)
    slow: dict[str, float] = field(default_factory=dict)
    drop_first: dict[str, int] = field(default_factory=dict)
    body_for: dict[str, tuple[str, str]] = field(default_factory=dict)  # key: (body, content type)
    content_for: dict[str, str] = field(default_factory=dict)
    headers_for: dict[str, dict[str, str]] = field(default_factory=dict)


class _Bucket:
    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.per_second)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.per_second


async def _cancel_the_rest() -> None:
    """Ends handlers still sleeping (a slow answer) before their loop closes."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


Server = TypeVar("Server", bound="BackgroundServer")


class BackgroundServer:
    """An aiohttp application on 127.0.0.1 (a free port), served by a thread with its own event
    loop. Subclasses add their routes in `_routes` and keep their books under ``_lock``."""

    def __init__(self) -> None:
        self.started_at = 0.0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def start(self: Server) -> Server:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as error:  # reported to start()
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.run_until_complete(_cancel_the_rest())
            loop.close()

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if failure:
            raise failure[0]
        self.started_at = time.monotonic()
        return self

    async def _open(self) -> None:
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
    return -(-chars // 4)


def _key(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict) and isinstance(messages[-1].get("content"), str):
        return str(messages[-1]["content"])
    return ""


def _sse(
    events: list[tuple[str | None, dict[str, Any]]], headers: dict[str, str], *, done: bool
) -> web.Response:
    """Server-sent events, all in one body (a client reads them the same way)."""
    lines = []
    for name, data in events:
        if name is not None:
            lines.append(f"event: {name}")
        lines.append(f"data: {json.dumps(data)}\n")
    if done:
        lines.append("data: [DONE]\n")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/event-stream", headers=headers)


def _chunks(answer: dict[str, Any], body: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """A streamed chat completion: the role, the content in two pieces, the finish, and the usage
    when ``stream_options.include_usage`` asks for it (as OpenAI streams it)."""
    text = answer["choices"][0]["message"]["content"]
    base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    half = len(text) // 2
    events: list[tuple[str | None, dict[str, Any]]] = [
        (None, chunk({"role": "assistant", "content": ""})),
        (None, chunk({"content": text[:half]})),
        (None, chunk({"content": text[half:]})),
        (None, chunk({}, "stop")),
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, base | {"choices": [], "usage": answer["usage"]}))
    return events


class ProviderServer(BackgroundServer):
    """The server and what it saw. Read the counters after the calls finished."""

    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ProviderConfig()
        self.calls: Counter[str] = Counter()  # every request, by key
        self.successes: Counter[str] = Counter()  # 200 answers, by key
        self.statuses: Counter[int] = Counter()
        self.usage: dict[str, int] = {}  # total_tokens of the last 200 answer, by key
        self.usage_parts: dict[str, tuple[int, int]] = {}  # its (prompt, completion) tokens
        self.bodies: dict[str, Any] = {}  # the JSON body of the last request, by key
        self.rate_limited_at: list[float] = []  # server time of each 429 answer
        self._buckets: tuple[_Bucket, _Bucket] | None = None
        self._rng = random.Random(self.config.seed)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def configure(self, **changes: Any) -> None:
        """Changes the configuration and starts the buckets full again."""
        with self._lock:
            for name, value in changes.items():
                setattr(self.config, name, value)
            self._buckets = None
            self._rng = random.Random(self.config.seed)
            self.started_at = time.monotonic()

    def _limits(self, now: float) -> tuple[_Bucket, _Bucket]:
        if self._buckets is None:
            config = self.config
            self._buckets = (
                _Bucket(config.burst_requests or config.rpm, config.rpm / 60.0, now),
                _Bucket(config.burst_tokens or config.tpm, config.tpm / 60.0, now),
            )
        requests, tokens = self._buckets
        requests.refill(now)
        tokens.refill(now)
        return requests, tokens

    def _headers(self, now: float) -> dict[str, str]:
        requests, tokens = self._limits(now)
        return {
            "x-ratelimit-limit-requests": str(int(self.config.rpm)),
            "x-ratelimit-remaining-requests": str(int(requests.level)),
            "x-ratelimit-reset-requests": f"{requests.until_full():.3f}s",
            "x-ratelimit-limit-tokens": str(int(self.config.tpm)),
            "x-ratelimit-remaining-tokens": str(int(tokens.level)),
            "x-ratelimit-reset-tokens": f"{tokens.until_full():.3f}s",
            "x-request-id": f"req_{random.getrandbits(64):016x}",
        }

    @staticmethod
    def _error(
        status: int, message: str, kind: str, headers: dict[str, str], code: str | None = None
    ) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    async def _chat(self, request: web.Request) -> web.Response:
        key, response = await self._answer(request)
        extra = self.config.headers_for.get(key)
        if extra:
            response.headers.update(extra)
        return response

    async def _answer(self, request: web.Request) -> tuple[str, web.Response]:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return "", self._error(400, "body is not JSON", "invalid_request_error", {})
        key = _key(body)
        config = self.config
        with self._lock:
            now = time.monotonic()
            self.calls[key] += 1
            self.bodies[key] = body
            attempt = self.calls[key]
            requests, tokens = self._limits(now)
            prompt = _prompt_tokens(body)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
            charge = prompt + int(max_tokens)
            wait = max(requests.wait_for(1), tokens.wait_for(charge))
            random_failure = config.fail_rate > 0 and self._rng.random() < config.fail_rate
            if wait == 0:
                requests.level -= 1
                tokens.level -= charge
        if key in config.status_for:
            status = config.status_for[key]
            return key, self._finish(
                status, self._error(status, f"refused {key}", "invalid_request_error", self._headers_now())
            )
        if key in config.quota:
            return key, self._finish(
                429,
                self._error(
                    429, "quota exceeded", "insufficient_quota", self._headers_now(), "insufficient_quota"
                ),
            )
        if wait > 0:
            headers = self._headers_now()
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            headers["retry-after"] = str(math.ceil(wait))
            with self._lock:
                self.rate_limited_at.append(time.monotonic() - self.started_at)
            return key, self._finish(
                429, self._error(429, "rate limit reached", "requests", headers, "rate_limit_exceeded")
            )
        delay = config.latency + (config.slow.get(key, 0.0) if attempt == 1 else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if attempt <= config.drop_first.get(key, 0):
            # The connection closes with no answer: the client sees a connection error.
            if request.transport is not None:
                request.transport.abort()
            return key, self._finish(0, web.Response(status=500))
        if attempt <= config.fail_first.get(key, 0) or random_failure:
            return key, self._finish(
                500, self._error(500, "internal error", "server_error", self._headers_now())
            )
        if key in config.body_for:
            text, content_type = config.body_for[key]
            return key, self._finish(
                200, web.Response(text=text, content_type=content_type, headers=self._headers_now())
            )
        completion = min(int(max_tokens), config.completion_tokens)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        with self._lock:
            self.successes[key] += 1
            self.usage[key] = prompt + completion
            self.usage_parts[key] = (prompt, completion)
        answer = {
            "id": f"chatcmpl-{key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": config.content_for.get(key, f"echo: {key}")},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage,
        }
        if body.get("stream"):
            return key, self._finish(200, _sse(_chunks(answer, body), self._headers_now(), done=True))
        return key, self._finish(200, web.json_response(answer, headers=self._headers_now()))

    def _headers_now(self) -> dict[str, str]:
        with self._lock:
            return self._headers(time.monotonic())

    def _finish(self, status: int, response: web.Response) -> web.Response:
        with self._lock:
            self.statuses[status] += 1
        return response

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)


def main() -> None:
    """``python -m tests.provider.server [--rpm N --tpm N ...]``: serve until Ctrl-C (for the
    README's captured output)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rpm", type=float, default=600.0)
    parser.add_argument("--tpm", type=float, default=100_000.0)
    parser.add_argument("--burst-requests", type=float, default=None)
    parser.add_argument("--burst-tokens", type=float, default=None)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    args = parser.parse_args()
    server = ProviderServer(
        ProviderConfig(
            rpm=args.rpm,
            tpm=args.tpm,
            burst_requests=args.burst_requests,
            burst_tokens=args.burst_tokens,
            latency=args.latency,
            fail_rate=args.fail_rate,
        )
    ).start()
    print(f"serving {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
        print(f"statuses: {dict(server.statuses)}")


if __name__ == "__main__":
    main()
