"""Iteration-level ("continuous") batching on one thread that owns the model.

Each loop iteration: admit waiting requests while rows are free (each prefilled alone, its first
token sampled), then run ONE decode step over every active request, sample each row with its
own generator, hand out text, and free the rows of requests that finished or whose client left.
A request that arrives while others decode joins at the next iteration; a short request never
waits for a long one to finish. Requests talk to the engine only through ``Sequence`` objects:
the HTTP side puts them in, the engine pushes ``Event``s back through their ``deliver``.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional

import torch

from megalite.generate import _prefill, sample_next
from megalite.models import CausalLM
from megalite.serve.batch import SlotCache, decode_step
from megalite.serve.text import TextStream


@dataclass
class Event:
    text: str
    finish_reason: Optional[str] = None  # "stop" | "length" | "error" once the sequence ends


@dataclass
class Sequence:
    """One choice of one request: prompt ids, sampling settings and its own generator."""

    prompt: List[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator
    text: TextStream
    deliver: Callable[[Event], None]  # called on the engine thread; must not block
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    cancelled: bool = False  # set by the HTTP side when the client leaves


class QueueFull(Exception):
    """The bounded waiting queue is full (HTTP 429)."""


class Engine:
    def __init__(self, model: CausalLM, eod_id: Optional[int], max_batch_size: int,
                 max_queue: int):
        self.model, self.eod_id = model, eod_id
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.cache = SlotCache(model, max_batch_size)
        self.device = next(model.parameters()).device
        self.active: List[Sequence] = []  # row r of the cache is active[r]
        self.waiting: Deque[List[Sequence]] = deque()  # groups sharing one prompt
        self.cv = threading.Condition()
        self.stopping = False
        self.forwards = 0  # decode steps
        self.batched_forwards = 0  # decode steps over more than one request
        self.abandoned = 0  # sequences dropped unfinished because their client left
        self.thread = threading.Thread(target=self._run, name="megalite-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is admitted and waiting, then end the thread."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()

    def submit_all(self, groups: List[List[Sequence]]) -> None:
        """Queue one request: a group of choices per prompt (a group is admitted at once, so
        its prompt is prefilled once). All or nothing: ``QueueFull`` when the waiting sequences
        would exceed ``max_queue``."""
        with self.cv:
            waiting = sum(len(g) for g in self.waiting)
            if waiting + sum(len(g) for g in groups) > self.max_queue:
                raise QueueFull(f"{waiting} sequences are waiting, at most {self.max_queue}")
            self.waiting.extend(groups)
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return {"active": len(self.active),
                    "waiting": sum(len(g) for g in self.waiting),
                    "forwards": self.forwards, "batched_forwards": self.batched_forwards,
                    "abandoned": self.abandoned}

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self.cv:
                while not (self.waiting or self.active or self.stopping):
                    self.cv.wait()
                if self.stopping and not (self.waiting or self.active):
                    return
                admitted = []
                while self.waiting and (len(self.active) + len(admitted)
                                        + len(self.waiting[0]) <= self.max_batch_size):
                    admitted.append(self.waiting.popleft())
            try:
                self._step(admitted)
            except Exception as e:  # noqa: BLE001 - never leave a client hanging
                for seq in self.active + [s for g in admitted for s in g]:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.deliver(Event(f"{type(e).__name__}: {e}", "error"))
                self.active = []

    def _step(self, admitted: List[List[Sequence]]) -> None:
        for group in admitted:
            live = [s for s in group if not s.cancelled]
            if not live:
                continue
            ids = torch.tensor([live[0].prompt], dtype=torch.long, device=self.device)
            caches, logits = _prefill(self.model, ids)
            for seq in live:
                self.cache.fill(len(self.active), caches)
                self.active.append(seq)
            self._emit(live, logits.expand(len(live), -1))
        self._free_finished()
        if not self.active:
            return
        last = torch.tensor([s.tokens[-1] for s in self.active], device=self.device)
        logits = decode_step(self.model, self.cache, last)
        self.forwards += 1
        self.batched_forwards += len(self.active) > 1
        self._emit(self.active, logits)
        self._free_finished()

    def _emit(self, seqs: List[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of ``logits`` [len(seqs), vocab] (its
        own settings and generator), bring them to the host in one transfer, and hand out the
        text."""
        picks = torch.cat([sample_next(logits[r:r + 1], s.temperature, s.top_k, s.top_p,
                                       s.generator) for r, s in enumerate(seqs)])
        for seq, token in zip(seqs, picks.tolist()):
            if not seq.cancelled:
                self._deliver(seq, token)

    def _deliver(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        if token == self.eod_id:
            seq.finish_reason = "stop"
            seq.deliver(Event(seq.text.flush(), "stop"))
            return
        piece, stopped = seq.text.push(token)
        if stopped:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.max_tokens:
            seq.finish_reason = "length"
            piece += seq.text.flush()
        seq.deliver(Event(piece, seq.finish_reason))

    def _free_finished(self) -> None:
        """Drop finished or abandoned rows, moving the last active row into each hole."""
        r = 0
        while r < len(self.active):
            seq = self.active[r]
            if seq.finish_reason is None and not seq.cancelled:
                r += 1
                continue
            self.abandoned += seq.finish_reason is None
            last = len(self.active) - 1
            if r != last:
                self.cache.move(last, r)
                self.active[r] = self.active[last]
            self.active.pop()
