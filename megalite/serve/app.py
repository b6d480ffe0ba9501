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

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from megalite.serve.engine import Engine, Event, QueueFull, Sequence
from megalite.serve.loading import Loaded
from megalite.serve.schemas import (SEED_LIMIT, APIError, ChatRequest, CompletionRequest,
                                    Limits, chunk_body, completion_body, error_body,
                                    max_tokens_for, new_id, parse, usage, usage_chunk)
from megalite.serve.text import TextStream, compile_chat_template, render_chat

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the room left


def create_app(loaded: Loaded, engine: Engine, limits: Limits,
               api_key: Optional[str] = None) -> FastAPI:
    template = compile_chat_template(loaded.chat_template) if loaded.chat_template else None
    tokenizer, device = loaded.tokenizer, engine.device

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()  # after uvicorn drained the in-flight requests

    app = FastAPI(title="megalite serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}"),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:1])), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise _too_large(limits)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise _too_large(limits)
        try:
            return json.loads(body)
        except ValueError as e:  # bad JSON or bad UTF-8
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    def check_model(name: str) -> None:
        if name != loaded.name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{loaded.name!r} (GET /v1/models)", "model", "model_not_found")

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> Dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": 0,
                                            "owned_by": "megalite",
                                            "max_model_len": limits.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        prompts = [_prompt_ids(p, tokenizer) for p in _prompt_list(req.prompt)]
        return await run(req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse(ChatRequest, await read_json(request))
        check_model(req.model)
        if template is None:
            raise APIError(400, f"model {loaded.name!r} has no chat template (tokenizer_config"
                                ".json chat_template); use /v1/completions", "messages")
        from jinja2 import TemplateError

        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(template, messages, loaded.special_tokens)
        except TemplateError as e:
            raise APIError(400, f"messages: the chat template refused them ({e})",
                           "messages") from None
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        return await run(req, [_prompt_ids(text, tokenizer)], chat=True)

    async def run(req, prompts: List[List[int]], chat: bool):
        if req.n > limits.max_batch_size or len(prompts) * req.n > limits.max_queue:
            raise APIError(400, f"n={req.n} x {len(prompts)} prompt(s): at most n="
                                f"{limits.max_batch_size} and {limits.max_queue} sequences "
                                "per request", "n")
        for ids in prompts:
            if any(not 0 <= i < loaded.model.args.vocab_size for i in ids):
                raise APIError(400, "prompt: token ids must lie in [0, vocab_size="
                                    f"{loaded.model.args.vocab_size})", "prompt")
        default = None if chat else COMPLETION_DEFAULT_MAX_TOKENS
        budgets = [max_tokens_for(req.max_tokens, len(ids), limits, default) for ids in prompts]
        stops = req.stops()
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        groups, seqs = [], []
        for ids, budget in zip(prompts, budgets):
            group = []
            for _ in range(req.n):
                k = len(seqs)  # choice k samples from its own generator seeded seed + k
                seq = Sequence(ids, budget, req.temperature, max(req.top_k, 0), req.top_p,
                               torch.Generator(device=device).manual_seed(seed + k),
                               TextStream(tokenizer, stops), _deliver(loop, queue, k))
                group.append(seq)
                seqs.append(seq)
            groups.append(group)
        try:
            engine.submit_all(groups)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later",
                           code="queue_full", kind="rate_limit_error") from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(rid, loaded.name, seqs, queue, prompt_tokens, chat, include),
                media_type="text/event-stream")
        try:
            texts, reasons = await _collect(seqs, queue)
        finally:
            for seq in seqs:  # a client that left before the end frees its rows
                seq.cancelled = True
        if "error" in reasons:
            raise APIError(500, "generation failed: " + texts[reasons.index("error")],
                           kind="server_error")
        use = usage(prompt_tokens, sum(len(s.tokens) for s in seqs))
        return completion_body(rid, loaded.name, texts, reasons, use, chat)

    return app


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
