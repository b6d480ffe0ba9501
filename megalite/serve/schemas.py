"""Request checking and OpenAI-shaped responses. Every user mistake becomes an ``APIError``: a
4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI fields megalite does not implement: refused when set, so nothing is silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools",
               "tool_choice", "functions", "function_call", "response_format")
MAX_STOP = 4  # as OpenAI
SEED_LIMIT = 2**62  # seed + choice index stays a valid torch seed


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                      code, kind)

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    context: int  # the model's max_seq_len: prompt + max_tokens must fit
    max_batch_size: int  # rows of the KV cache; n may not exceed it
    max_queue: int  # sequences waiting for a row; a request may not exceed it
    max_body_bytes: int


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other clients' fields; UNSUPPORTED are refused

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension (extra_body); 0 or -1: off
    n: int = Field(1, ge=1)
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def stops(self) -> List[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
        return stop


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int], List[List[int]]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, List[Dict[str, Any]], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: text only
            if any(p.get("type") != "text" for p in self.content):
                raise APIError(400, "messages: only text content parts are supported",
                               "messages")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def parse(kind: type, data: Any) -> Any:
    """``kind`` from a JSON value, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        if data.get(name) not in (None, False):
            raise APIError(400, f"{name} is not supported by megalite serve; drop it", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0):
            raise APIError(400, f"{name}={data[name]!r}: penalties are not supported by "
                                "megalite serve; leave it at 0", name)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return _raise(APIError(400, f"{param}: {first['msg']} (got {first.get('input')!r:.80})",
                               param))


def _raise(e: Exception):
    raise e


def max_tokens_for(asked: Optional[int], prompt_len: int, limits: Limits,
                   default: Optional[int]) -> int:
    """The number of tokens to generate: ``asked``, or ``default`` capped to the room left;
    a 400 when the prompt leaves no room or ``asked`` does not fit the context."""
    room = limits.context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is "
                            f"{limits.context} tokens: shorten the prompt", "prompt",
                       "context_length_exceeded")
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise APIError(400, f"this model's context is {limits.context} tokens; the prompt is "
                            f"{prompt_len} and max_tokens {asked}: lower max_tokens to at most "
                            f"{room}", "max_tokens", "context_length_exceeded")
    return asked


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, texts: List[str], reasons: List[Optional[str]],
                    use: Dict[str, int], chat: bool) -> Dict[str, Any]:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": use}


def chunk_body(rid: str, model: str, index: int, text: Optional[str], reason: Optional[str],
               chat: bool, role: bool = False) -> Dict[str, Any]:
    """One server-sent event's JSON: a piece of choice ``index`` (``role`` opens a chat turn)."""
    if chat:
        delta: Dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, use: Dict[str, int], chat: bool) -> Dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}
