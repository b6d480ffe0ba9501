"""The FastAPI app: OpenAI's completions, chat completions and models endpoints, plus /health.

Every failure a client can cause is a 4xx JSON error in OpenAI's shape, raised before anything
reaches the engine; an unexpected one is a 500 of the same shape, and the server keeps serving.
The body size limit is enforced here while reading (uvicorn has none). With an API key set,
every /v1 route wants ``Authorization: Bearer KEY`` (compared in constant time)."""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from megalite.generate import row_generators
from megalite.serve.engine import Engine, Event, QueueFull, Sequence
from megalite.serve.loading import Loaded
from megalite.serve.schemas import (SEED_LIMIT, APIError, ChatRequest, CompletionRequest,
                                    Limits, chunk_body, completion_body, error_body,
                                    max_tokens_for, new_id, parse, usage, usage_chunk)
from megalite.serve.text import TextStream, compile_chat_template, render_chat

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the room left


def create_app(loaded: Loaded, engine: Engine, limits: Limits,
               api_key: Optional[str] = None) -> FastAPI:
    """The app serving ``loaded`` through ``engine`` (started and stopped with the app)."""
    api = Endpoints(loaded, engine, limits, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()  # after uvicorn drained the in-flight requests

    app = FastAPI(title="megalite serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)  # unknown route, wrong method
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    return app


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}"),
                        status_code=e.status_code)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(str(e.errors()[:1])), status_code=400)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"),
                        status_code=500)


class Endpoints:
    """The routes; each checks its request completely before anything reaches the engine."""

    def __init__(self, loaded: Loaded, engine: Engine, limits: Limits, api_key: Optional[str]):
        self.loaded, self.engine, self.limits, self.api_key = loaded, engine, limits, api_key
        self.template = (compile_chat_template(loaded.chat_template)
                         if loaded.chat_template else None)

    async def health(self) -> Dict[str, Any]:
        return {"status": "ok", **self.engine.stats()}

    async def models(self, request: Request) -> Dict[str, Any]:
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.loaded.name, "object": "model",
                                            "created": 0, "owned_by": "megalite",
                                            "max_model_len": self.limits.context}]}

    async def completions(self, request: Request):
        self.authorize(request)
        req = parse(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        prompts = [_prompt_ids(p, self.loaded.tokenizer) for p in _prompt_list(req.prompt)]
        return await self.run(request, req, prompts, chat=False)

    async def chat_completions(self, request: Request):
        from jinja2 import TemplateError

        self.authorize(request)
        req = parse(ChatRequest, await self.read_json(request))
        self.check_model(req.model)
        if self.template is None:
            raise APIError(400, f"model {self.loaded.name!r} has no chat template "
                                "(tokenizer_config.json chat_template); use /v1/completions",
                           "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(self.template, messages, self.loaded.special_tokens)
        except TemplateError as e:
            raise APIError(400, f"messages: the chat template refused them ({e})",
                           "messages") from None
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        return await self.run(request, req, [_prompt_ids(text, self.loaded.tokenizer)],
                              chat=True)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, read no further than ``max_body_bytes`` (413 beyond)."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise _too_large(self.limits)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise _too_large(self.limits)
        try:
            return json.loads(body)
        except ValueError as e:  # bad JSON or bad UTF-8
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    def check_model(self, name: str) -> None:
        if name != self.loaded.name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.loaded.name!r} (GET /v1/models)", "model",
                           "model_not_found")

    async def run(self, request: Request, req, prompts: List[List[int]], chat: bool):
        """Queue every choice of every prompt, then answer at once or as a stream. A client
        that leaves cancels its sequences (their rows are freed at the engine's next step)."""
        seqs, queue = self.sequences(req, prompts, chat)
        per_prompt = [seqs[i:i + req.n] for i in range(0, len(seqs), req.n)]
        try:
            self.engine.submit_all(per_prompt)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later",
                           code="queue_full", kind="rate_limit_error") from None
        rid, name = new_id("chatcmpl" if chat else "cmpl"), self.loaded.name
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(rid, name, seqs, queue, prompt_tokens, chat,
                                             include), media_type="text/event-stream")
        collect = asyncio.ensure_future(_collect(seqs, queue))
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler itself is cancelled: neither task outlives it
            gone = not collect.done()  # the client left first: there is nobody to answer
            for task in (left, collect):
                task.cancel()  # a no-op on a finished task
            for seq in seqs:  # done, or nobody waits for the rest
                seq.cancelled = True
        if gone:
            return Response(status_code=499)  # "client closed request", as nginx logs it
        texts, reasons = collect.result()
        if "error" in reasons:
            raise APIError(500, "generation failed: " + texts[reasons.index("error")],
                           kind="server_error")
        use = usage(prompt_tokens, sum(len(s.tokens) for s in seqs))
        return completion_body(rid, name, texts, reasons, use, chat)

    def sequences(self, req, prompts: List[List[int]],
                  chat: bool) -> Tuple[List[Sequence], asyncio.Queue]:
        """One ``Sequence`` per choice (prompt-major), all reporting to one queue; a 4xx for
        what does not fit (n, ids, context)."""
        limits, vocab = self.limits, self.loaded.model.args.vocab_size
        if req.n > limits.max_batch_size or len(prompts) * req.n > limits.max_queue:
            raise APIError(400, f"n={req.n} x {len(prompts)} prompt(s): at most n="
                                f"{limits.max_batch_size} and {limits.max_queue} sequences "
                                "per request", "n")
        if any(not 0 <= i < vocab for ids in prompts for i in ids):
            raise APIError(400, f"prompt: token ids must lie in [0, vocab_size={vocab})",
                           "prompt")
        default = None if chat else COMPLETION_DEFAULT_MAX_TOKENS
        budgets = [max_tokens_for(req.max_tokens, len(ids), limits, default) for ids in prompts]
        stops = req.stops()
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs: List[Sequence] = []
        # choice k samples from its own generator seeded seed + k, as generate's row k does
        generators = row_generators(seed, len(prompts) * req.n, self.engine.device)
        for ids, budget in zip(prompts, budgets):
            for _ in range(req.n):
                k = len(seqs)
                seqs.append(Sequence(ids, budget, req.temperature, max(req.top_k, 0), req.top_p,
                                     generators[k], TextStream(self.loaded.tokenizer, stops),
                                     _deliver(loop, queue, k)))
        return seqs, queue


def _too_large(limits: Limits) -> APIError:
    return APIError(413, f"the request body exceeds {limits.max_body_bytes} bytes "
                         "(megalite serve --max_body_bytes)", code="body_too_large")


def _prompt_list(prompt: Any) -> List[Any]:
    """OpenAI's prompt forms: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list", "prompt")
    return list(prompt)


def _prompt_ids(prompt: Any, tokenizer) -> List[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return ids or [tokenizer.eod_id]  # an empty prompt starts a document


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, k: int):
    def deliver(event: Event) -> None:  # on the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (k, event))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
    return deliver


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read by then, so the
    server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(seqs: List[Sequence], queue: asyncio.Queue) -> Tuple[List[str], List[str]]:
    texts, reasons = [""] * len(seqs), [None] * len(seqs)
    left = len(seqs)
    while left:
        k, event = await queue.get()
        texts[k] = event.text if event.finish_reason == "error" else texts[k] + event.text
        if event.finish_reason is not None:
            reasons[k] = event.finish_reason
            left -= 1
    return texts, reasons


async def _stream(rid: str, model: str, seqs: List[Sequence], queue: asyncio.Queue,
                  prompt_tokens: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: pieces as they come, ``[DONE]`` last. Leaving early (the client
    disconnected) cancels the sequences, which frees their rows at the engine's next step."""
    try:
        if chat:
            for k in range(len(seqs)):
                yield _sse(chunk_body(rid, model, k, "", None, chat, role=True))
        left = len(seqs)
        while left:
            k, event = await queue.get()
            if event.finish_reason == "error":
                yield _sse(error_body(f"generation failed: {event.text}", "server_error"))
                return
            if event.finish_reason is not None:
                left -= 1
            if event.text or event.finish_reason is not None:
                yield _sse(chunk_body(rid, model, k, event.text, event.finish_reason, chat))
        if include_usage:
            use = usage(prompt_tokens, sum(len(s.tokens) for s in seqs))
            yield _sse(usage_chunk(rid, model, use, chat))
        yield "data: [DONE]\n\n"
    finally:
        for seq in seqs:
            seq.cancelled = True


def _sse(body: Dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
