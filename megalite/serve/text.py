"""Tokens to streamed text: stop strings, incomplete characters, chat templates."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

REPLACEMENT = "\ufffd"  # what a decoder prints for the bytes of a character not yet complete
MAX_HELD = 3  # a UTF-8 character has at most 4 bytes: 3 tokens more cannot complete it


class TextStream:
    """The text of one sequence's new tokens, handed out in pieces that never need taking back.

    ``push(token)`` returns (new text, stopped). Text is held back while it may still change: a
    trailing incomplete UTF-8 character (decoded as U+FFFD; for at most ``MAX_HELD`` tokens, after
    which the bytes are invalid for good and go out as U+FFFD), or a tail that could be the start
    of a stop string. When a stop string appears, the text ends just before it (OpenAI's rule: the
    stop string itself is not returned)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.held = 0  # pushes in a row that ended in U+FFFD

    def push(self, token: int) -> Tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            piece, self.sent = text[self.sent:end], max(self.sent, end)
            return piece, True
        end = len(text)
        if text.endswith(REPLACEMENT) and self.held < MAX_HELD:
            self.held += 1
            while end > self.sent and text[end - 1] == REPLACEMENT:
                end -= 1
        else:
            self.held = 0
        end -= self._stop_prefix(text[:end])
        piece = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece, False

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
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
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
