"""Tokens to streamed text: stop strings, incomplete characters, chat templates."""
from __future__ import annotations

import codecs
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megalite.data.tokenizer import ByteTokenizer

REPLACEMENT = "\ufffd"  # what a decoder prints for the bytes of a character not yet complete


class TextStream:
    """The text of one sequence's new tokens, handed out in pieces that never need taking back.

    ``push(token)`` returns (new text, stopped). Text is held back while it may still change: a
    trailing incomplete UTF-8 character, or a tail that could be the start of a stop string.
    With the bytes tokenizer, invalid bytes go out as U+FFFD at once; with other tokenizers text
    ending in U+FFFD waits for the next token (a model emitting only broken characters then
    streams nothing until it ends). When a stop string appears, the text ends just before it
    (OpenAI's rule: the stop string itself is not returned)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.text = ""  # the decoded text of ids[:read]
        # ids[prefix:read] are decoded again with each new token, as context: a decoder may
        # treat a call's first token differently (SentencePiece drops its leading space), so
        # new text is the difference of two decodes that start at the same token (as vLLM does)
        self.prefix = self.read = 0
        self.sent = 0  # characters of text already handed out
        self.utf8 = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                     if isinstance(tokenizer, ByteTokenizer) else None)

    def push(self, token: int) -> Tuple[str, bool]:
        self.ids.append(token)
        self._decode_new(final=False)
        text = self.text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            piece, self.sent = text[self.sent:end], max(self.sent, end)
            return piece, True
        end = len(text) - self._stop_prefix(text)
        piece = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece, False

    def _decode_new(self, final: bool) -> None:
        """Append the text of the new tokens that can no longer change."""
        n = len(self.ids)
        if self.utf8 is not None:  # bytes: Python's incremental decoder keeps exactly the
            # bytes of an incomplete character and replaces invalid ones as decode() does
            new = bytes(i for i in self.ids[self.read:] if 0 <= i < 256)
            self.text += self.utf8.decode(new, final=final)
            self.read = n
            return
        # Other tokenizers give text only: one ending in U+FFFD may be a character whose bytes
        # are still coming, so it waits (vLLM's rule) until it ends otherwise or ``final``
        after = self._decode(n)
        if final or not after.endswith(REPLACEMENT):
            self.text += after[len(self._decode(self.read)):]
            self.prefix, self.read = self.read, n

    def _decode(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.prefix:end])

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text) - self.sent), longest, -1):
                if s.startswith(text[len(text) - k:]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """Whatever was held back, once the sequence has ended for another reason."""
        self._decode_new(final=True)
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def compile_chat_template(template: str):
    """A Jinja template in the sandbox transformers uses (no attribute access to internals, no
    mutation of the inputs): a chat template from a file cannot run code."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template, messages: List[Dict[str, str]], special: Dict[str, str]) -> str:
    """The prompt text of ``messages``, ending where the assistant's reply begins."""
    return template.render(messages=messages, add_generation_prompt=True,
                           bos_token=special.get("bos_token", ""),
                           eos_token=special.get("eos_token", ""))


def chat_template_problem(template: Optional[str]) -> Optional[str]:
    """Why ``template`` cannot be compiled, or None."""
    if template is None:
        return None
    from jinja2 import TemplateError

    try:
        compile_chat_template(template)
    except TemplateError as e:
        return f"chat_template does not compile: {e}"
    return None
