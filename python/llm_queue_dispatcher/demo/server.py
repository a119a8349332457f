"""The web side of ``llmqd demo``: an aiohttp app over a `DemoEngine` (extra ``[demo]``).

Routes (all on 127.0.0.1):

- ``GET /``: the page; ``GET /static/...``: its script, styles and the vendored uPlot.
- ``GET /events``: server-sent events. ``hello`` once (strategies, controls, chart history),
  then ``snapshot`` every ``push_interval`` seconds: counts and the head of each section of
  each lane, statistics, and one chart point. The page never polls per element. A page that
  goes away (a closed tab, a reload, a reset connection) ends its stream quietly.
- ``POST /api/controls`` (JSON object of `Controls` fields) and ``POST /api/burst``
  (``{"size": n, "priority": null | "URGENT" | ... }``): validated whole; a bad value, a limit
  that could never admit a request, or a hostile body (not JSON, nested too deeply, huge
  numbers, wrong types) gets ``400 {"error": ...}`` with a one-line message naming the field,
  logs no traceback and changes nothing.
- ``GET /api/requests/{lane}/{id}``: score breakdown and reason of a request in flight or
  recently settled (one fetch per click).
- ``GET /metrics``: the `llm_queue_dispatcher.prometheus` metrics of every lane, label
  ``strategy``, refreshed at each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..errors import InvalidConfigError
from ..prometheus import QueueCollector
from .engine import DemoEngine, encode

__all__ = ["SERVER_KEY", "DemoServer", "create_app", "serve"]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
HOST = "127.0.0.1"
# Seconds of loop time between engine steps: dispatch granularity (times the speed) and the
# main CPU cost of an idle demo.
_TICK = 0.05
# Chart points kept for a page that connects late (at 4 per second: two minutes).
_HISTORY = 480
_MAX_BODY = 16 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _static_dir() -> Path:
    return Path(str(resources.files("llm_queue_dispatcher.demo") / "static"))


class _Hub:
    """Fans one encoded frame out to every connected page; a slow page loses old frames."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()
        self.history: deque[dict[str, Any]] = deque(maxlen=_HISTORY)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.subscribers.discard(queue)

    def publish(self, frame: bytes | None) -> None:
        for queue in self.subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(frame)


class DemoServer:
    """The engine, its driving task, the event hub and the Prometheus collector of one app."""

    def __init__(self, engine: DemoEngine, *, push_interval: float = 0.25) -> None:
        self.engine = engine
        self.push_interval = push_interval
        self.hub = _Hub()
        self.collector = QueueCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        for lane in engine.lanes:
            lane.observer = self.collector.watch(lane.dispatcher, lane.limiter, strategy=lane.strategy.name)
        self._task: asyncio.Task[None] | None = None

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        next_push = loop.time()
        while True:
            try:
                await engine.step()
                if loop.time() >= next_push:
                    snapshot = await engine.snapshot()
                    point = engine.chart_point(snapshot)
                    self.hub.history.append(point)
                    self.hub.publish(encode("snapshot", {**snapshot, "point": point}))
                    next_push = max(next_push + self.push_interval, loop.time())
            except Exception:
                _LOGGER.exception("demo engine step failed")
            await asyncio.sleep(_TICK)

    async def start(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drive())

    async def shutdown(self, app: web.Application) -> None:
        # Ends every open event stream, so the server stops without waiting for them.
        self.hub.publish(None)

    async def cleanup(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.engine.close()

    # -- handlers ------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(_static_dir() / "index.html", headers={"Cache-Control": "no-cache"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        queue = self.hub.subscribe()
        try:
            # Inside the try: a page that left before the headers went out fails here already.
            await response.prepare(request)
            hello = {**self.engine.describe(), "history": list(self.hub.history)}
            await response.write(encode("hello", hello))
            while True:
                frame = await queue.get()
                if frame is None:
                    break
                await response.write(frame)
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one
            _LOGGER.debug("an /events client went away")
        finally:
            self.hub.unsubscribe(queue)
        return response

    @staticmethod
    async def _json_object(request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            # Also keeps other web pages from posting here: a cross-origin JSON post needs a
            # CORS preflight, which this server never grants.
            raise web.HTTPUnsupportedMediaType(
                text=json.dumps({"error": "send a JSON object with Content-Type: application/json"}),
                content_type="application/json",
            )
        try:
            body = json.loads(await request.read())
        except RecursionError:
            raise _bad_request("the body is nested too deeply to be a control change") from None
        except ValueError as error:  # also a number of more than 4,300 digits, or not UTF-8
            raise _bad_request(f"the body is not valid JSON: {str(error)[:80]}") from None
        if not isinstance(body, dict):
            raise _bad_request(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def controls(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_object(request)
        try:
            controls = self.engine.set_controls(body)
        except InvalidConfigError as error:
            raise _bad_request(str(error)) from None
        return web.json_response({"controls": controls.to_dict()})

    async def burst(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_object(request)
        unknown = sorted(set(body) - {"size", "priority"})
        if unknown:
            raise _bad_request(f"unknown field(s): {', '.join(unknown)}")
        try:
            count = await self.engine.burst(body.get("size"), body.get("priority"))
        except InvalidConfigError as error:
            raise _bad_request(str(error)) from None
        return web.json_response({"enqueued": count})

    async def request_detail(self, request: web.Request) -> web.StreamResponse:
        detail = self.engine.request_detail(request.match_info["lane"], request.match_info["id"])
        if detail is None:
            raise web.HTTPNotFound(
                text=json.dumps(
                    {"error": "not in flight or recently settled (pending requests have no score yet)"}
                ),
                content_type="application/json",
            )
        return web.json_response(detail)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = await self.collector.render(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def _local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers only requests addressed to this machine by name (a DNS-rebinding guard)."""
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    if host not in {"127.0.0.1", "localhost"}:
        raise web.HTTPForbidden(text="llmqd demo answers on 127.0.0.1 only")
    return await handler(request)


#: Where `create_app` keeps the `DemoServer` in the application.
SERVER_KEY = web.AppKey("llmqd_demo", DemoServer)


def create_app(engine: DemoEngine, *, push_interval: float = 0.25) -> web.Application:
    """The aiohttp application of the demo over ``engine`` (started and stopped with the app)."""
    server = DemoServer(engine, push_interval=push_interval)
    app = web.Application(client_max_size=_MAX_BODY, middlewares=[_local_only])
    app[SERVER_KEY] = server
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.shutdown)
    app.on_cleanup.append(server.cleanup)
    app.router.add_get("/", server.index)
    app.router.add_static("/static", _static_dir(), follow_symlinks=False, show_index=False)
    app.router.add_get("/events", server.events)
    app.router.add_post("/api/controls", server.controls)
    app.router.add_post("/api/burst", server.burst)
    app.router.add_get("/api/requests/{lane}/{id}", server.request_detail)
    app.router.add_get("/metrics", server.metrics)
    return app


async def serve(engine: DemoEngine, port: int, *, on_ready: Callable[[str], None]) -> None:
    """Serves the demo on 127.0.0.1:``port`` (0: any free port) until SIGINT or SIGTERM.

    ``on_ready`` receives the URL once the socket listens. Raises `OSError` when the port cannot
    be bound.
    """
    app = create_app(engine)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, HOST, port)
        await site.start()
        bound = runner.addresses[0][1]
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
            except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
                pass
        on_ready(f"http://{HOST}:{bound}/")
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
