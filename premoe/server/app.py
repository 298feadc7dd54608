"""``premoe serve``: an OpenAI-compatible HTTP server that holds only the current task's pattern.

Endpoints: ``GET /v1/models`` (``auto`` plus one entry per stored task), ``POST
/v1/chat/completions``, ``POST /v1/completions``, ``GET /health`` and ``GET /metrics``
(Prometheus). ``model: "auto"`` routes each request by its own signature (the prompt as the model
sees it, chat template applied); a task name pins that task's pattern. Every response says which
task served it in a ``premoe`` field (OpenAI clients ignore it) and in ``X-Premoe-*`` headers.
Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

The HTTP layer (FastAPI on uvicorn) only validates, queues and relays; the work happens in
:mod:`premoe.server.scheduler`'s worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from premoe.errors import PremoeError
from premoe.server.backend import context_length, encode, render_chat
from premoe.server.engine import Sampling
from premoe.server.metrics import Metrics
from premoe.server.options import ServeOptions
from premoe.server.scheduler import Job, QueueFull, Scheduler, ShuttingDown

AUTO = "auto"
MAX_STOPS = 4


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.code, self.param, self.headers = code, param, headers


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status, headers=e.headers)


# -- request bodies (unknown fields are ignored, as OpenAI does) -------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # vLLM's extension, as its OpenAI server takes it


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# -- the guard: API key and body size, before FastAPI parses anything --------------------------
class Guard:
    """Pure ASGI middleware: requires ``Authorization: Bearer KEY`` on every path but ``/health``
    (when a key is set) and refuses bodies over ``max_body`` bytes (413) without reading more."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def _reject(self, send, status: int, message: str, type_: str, code: str) -> None:
        body = json.dumps(error_body(message, type_, code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "wrong API key" if given else "missing API key (send Authorization: Bearer KEY)"
                return await self._reject(send, 401, what, "authentication_error", "invalid_api_key")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.max_body} bytes; send a shorter prompt"
        try:
            if int(headers.get(b"content-length", b"0")) > self.max_body:
                return await self._reject(send, 413, too_big, "invalid_request_error", "request_too_large")
        except ValueError:
            return await self._reject(send, 400, "bad Content-Length header", "invalid_request_error", "bad_request")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_body:
                return await self._reject(send, 413, too_big, "invalid_request_error", "request_too_large")
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# -- the application ---------------------------------------------------------------------------
class Service:
    """Validation and relaying shared by the two completion endpoints."""

    def __init__(self, backend, opts: ServeOptions):
        self.backend, self.opts = backend, opts
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            backend,
            max_queue=opts.max_queue,
            max_batch=opts.max_batch,
            policy=opts.policy,
            max_wait=opts.max_wait,
            metrics=self.metrics,
            continuous=opts.continuous,
        )
        self.context = context_length(backend)
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return [AUTO, *self.backend.tasks]

    def pinned(self, model: str) -> str | None:
        if model == AUTO:
            return None
        if model in self.backend.tasks:
            return model
        raise APIError(
            404,
            f"the model {model!r} does not exist; use 'auto' (route each request) or one of the "
            f"stored tasks: {', '.join(self.backend.tasks)}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    def sampling(self, req: _Common, max_tokens: int | None, n_prompt: int) -> Sampling:
        if req.n not in (None, 1):
            raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
        if not 0.0 < top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS or any(not s for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        room = None if self.context is None else self.context - n_prompt
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if room is not None and room < 1:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens, but this model's context is {self.context} tokens; shorten it",
                code="context_length_exceeded",
                param="messages",
            )
        if max_tokens is None:
            max_tokens = min(x for x in (room, self.opts.max_tokens, 1 << 30) if x is not None)
        elif room is not None and max_tokens > room:
            raise APIError(
                400,
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                f"context of {self.context} tokens; lower max_tokens or shorten the prompt",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return Sampling(max_tokens, temperature, top_p, req.seed, tuple(stop), bool(req.ignore_eos))

    async def run(self, request: Request, kind: str, req: _Common, text: str, templated: bool, max_tokens):
        pinned = self.pinned(req.model)
        if not text.strip():
            raise APIError(400, "the prompt is empty; send some text", param="messages" if kind == "chat" else "prompt")
        ids = encode(self.backend.tokenizer, text, templated)
        sampling = self.sampling(req, max_tokens, len(ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(text, ids, sampling, lambda k, p: loop.call_soon_threadsafe(events.put_nowait, (k, p)), pinned=pinned)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise APIError(
                503,
                f"the server is busy ({self.opts.max_queue} requests queued); retry shortly",
                "server_overloaded",
                "queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", "server_overloaded", "shutting_down") from None
        first = await self._next(request, job, events)
        if first is None:
            return Response(status_code=499)
        kind_, payload = first
        if kind_ == "error":
            raise APIError(payload[0], payload[1], "invalid_request_error" if payload[0] < 500 else "server_error")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        headers = self.headers(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self.sse(request, kind, rid, req.model, job, events, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        while True:
            ev = await self._next(request, job, events)
            if ev is None:
                return Response(status_code=499)
            if ev[0] == "error":
                raise APIError(ev[1][0], ev[1][1], "server_error")
            if ev[0] == "done":
                break
        choice: dict[str, Any] = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": job.text_out}
        else:
            choice["text"] = job.text_out
        body = {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "usage": self.usage(job),
            "premoe": self.info(job),
        }
        return JSONResponse(body, headers=headers)

    async def _next(self, request: Request, job: Job, events: asyncio.Queue):
        """The next worker event; None (and the job cancelled) if the client went away first."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    return None

    async def sse(self, request, kind, rid, model, job: Job, events: asyncio.Queue, include_usage: bool):
        created, obj = int(time.time()), "chat.completion.chunk" if kind == "chat" else "text_completion"
        finished = False

        def chunk(delta: str | None, finish=None, role=False) -> str:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "premoe": self.info(job),
            }
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            while True:
                ev = await events.get()
                if ev[0] == "delta":
                    yield chunk(ev[1])
                elif ev[0] == "error":
                    finished = True
                    yield f"data: {json.dumps(error_body(ev[1][1], 'server_error'))}\n\n"
                    return
                elif ev[0] == "done":
                    finished = True
                    yield chunk(None, finish=job.finish_reason)
                    if include_usage:
                        tail = {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": self.usage(job),
                        }
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client disconnected: stop generating for it
                job.cancelled = True

    @staticmethod
    def usage(job: Job) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt_ids) + job.completion_tokens,
        }

    @staticmethod
    def info(job: Job) -> dict[str, Any]:
        return {
            "task": job.task,
            "selection": "pinned" if job.pinned else "routed",
            "distance": job.distance,
            "margin": job.margin,
            "switched": job.switched,
            "queue_seconds": None if job.started is None else round(job.started - job.arrived, 6),
        }

    @staticmethod
    def headers(job: Job) -> dict[str, str]:
        h = {
            "X-Premoe-Task": job.task or "",
            "X-Premoe-Selection": "pinned" if job.pinned else "routed",
            "X-Premoe-Switched": "true" if job.switched else "false",
        }
        if job.distance is not None:
            h["X-Premoe-Distance"] = f"{job.distance:.6g}"
        if job.margin is not None:
            h["X-Premoe-Margin"] = f"{job.margin:.6g}"
        return h


def _content(m: Message, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text" or p.text is None:
            raise APIError(
                400, f"messages[{i}]: only text content is supported, got a {p.type!r} part", param="messages"
            )
        parts.append(p.text)
    return "".join(parts)


def _validation_message(errs: list[dict]) -> str:
    if not errs:
        return "malformed request"
    e = errs[0]
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    return f"{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "malformed request")


async def parse(request: Request, model: type[_Body]):
    """The request body as ``model``: 400 with a one-line reason for bodies that are not a JSON
    object of the right shape (whatever the Content-Type says, as OpenAI's clients send JSON)."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errs = e.errors()
        param = str(errs[0]["loc"][0]) if errs and errs[0].get("loc") else None
        raise APIError(400, _validation_message(errs), param=param) from None


def create_app(backend, opts: ServeOptions | None = None) -> Guard:
    """The ASGI app serving ``backend`` (a :class:`~premoe.server.backend.TaskBackend`); its
    :class:`Service` (scheduler, metrics) is the returned app's ``service``."""
    opts = opts or ServeOptions()
    svc = Service(backend, opts)

    @asynccontextmanager
    async def lifespan(app):
        svc.scheduler.start()
        yield
        await asyncio.to_thread(svc.scheduler.stop)  # uvicorn has drained the connections; finish the queue

    app = FastAPI(title="premoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(APIError(400, _validation_message(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code)
        )

    @app.exception_handler(PremoeError)
    async def _premoe(request, e: PremoeError):
        return error_response(APIError(400, str(e)))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            svc.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def resident() -> list[str]:
        """The tasks whose patterns are held (several where the backend holds several: ``--held-tasks``)."""
        held = getattr(backend, "held_tasks", None)
        return list(held) if held is not None else [t for t in (backend.task,) if t is not None]

    @app.get("/health")
    async def health():
        draining = svc.scheduler.stopping
        body = {"status": "draining" if draining else "ok", "task": backend.task, "held": resident()}
        body["queue"] = svc.scheduler.depth()
        return JSONResponse(body, status_code=503 if draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(mid: str) -> dict[str, Any]:
        return {
            "id": mid,
            "object": "model",
            "created": svc.created,
            "owned_by": "premoe",
            "premoe": {"task": None if mid == AUTO else mid, "resident": mid in resident()},
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(m) for m in svc.model_ids()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        svc.pinned(model_id)
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one message", param="messages")
        msgs = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(req.messages)]
        text, templated = render_chat(backend.tokenizer, msgs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await svc.run(request, "chat", req, text, templated, max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"send one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if req.echo or req.logprobs or req.suffix or (req.best_of or 1) > 1:
            raise APIError(400, "echo, logprobs, suffix and best_of are not supported", param="prompt")
        return await svc.run(request, "completion", req, prompt, False, req.max_tokens)

    guard = Guard(app, opts.api_key, opts.max_body_bytes)
    guard.service = svc
    return guard
