"""Parallel decoding in process: one llama.cpp context with a sequence per slot, decoded together.

A model in process answers one task at a time through `llama_cpp.Llama` (its context holds one
sequence). With `llm_slots` above 1 the worker gives the loaded model a `Decoder` as well: a
second llama.cpp context on the same weights with `n_seq_max` = slots and a KV cache of slots
times the model's `n_ctx` (one cache, unified, each sequence held to `n_ctx`), and one thread
that drives it. Each step of that thread is one `llama_decode` call over a batch that holds, for
every running request, the token it sampled last, and then as much of newly admitted prompts as
the batch has room for. So the weights are read once per step for all the requests in it, where
one task at a time reads them once per token of each: on the 2-core CPU machine, 8 prompts
decode at about twice the tokens/s of one (docs/gpus.md, "Parallel decoding").

This is continuous batching: a request joins at the next step after a slot frees, and leaves at
its end-of-generation token, its stop string, its `max_tokens`, or when its task is stopped
(cancelled or timed out: the `halt` event, checked every step). Each request samples with its
own llama.cpp sampler chain (greedy at temperature 0; else top-k 40, top-p 0.95, min-p 0.05,
temperature and a seeded draw, llama-cpp-python's defaults), held to the task's grammar (a
review's word, a JSON schema) where it has one. Its text goes to `on_text` piece by piece as
it is decoded, but for what could be the start of a stop string, held back until it is not.

Pure llama-cpp-python low-level API (ctypes over llama.h): the batch, the context, the sampler
chains, the KV cache's per-sequence removal. Nothing here touches the event loop: `submit`
returns a `concurrent.futures.Future` the executor wraps.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mesh.worker")

# llama.cpp's own bound on a context's sequences (LLAMA_MAX_SEQ)
MAX_SLOTS = 256


def _quiet(_text: str) -> None:
    """Where a request's text goes when nobody listens."""


class DecoderClosed(RuntimeError):
    """The decoder was closed (its model unloaded) before the request ended."""


@dataclass
class Request:
    """One prompt to complete. `tokens` is the whole prompt, BOS included."""

    tokens: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stop: Sequence[str] = ()
    # a llama_cpp.LlamaGrammar (or anything with `_grammar` and `_root`), or None for free text
    grammar: Any = None
    # set by whoever waits for it: the request ends at the next step, its text so far kept
    halt: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] = _quiet
    # set when its first token is sampled
    sampled: threading.Event | None = None


@dataclass
class Outcome:
    text: str
    tokens_out: int
    # 'stop' (end of generation or a stop string), 'length' (max_tokens), 'halted'
    finish: str
    submitted: float
    admitted: float
    first: float
    ended: float
    # the most requests decoded together in one step while this one ran
    parallel: int


class _Text:
    """A request's answer as it is decoded: bytes to text (a character may span tokens), cut at
    the first stop string, and what may still turn out to be a stop string's start held back."""

    def __init__(self, stop: Sequence[str], on_text: Callable[[str], None]) -> None:
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0

    def add(self, piece: bytes) -> bool:
        """Add a token's bytes; True when a stop string has ended the answer."""
        self.text += self.decoder.decode(piece)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._send(len(self.text))
            return True
        self._send(len(self.text) - self._held())
        return False

    def finish(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        self._send(len(self.text))
        return self.text

    def _held(self) -> int:
        """How many characters at the end could open a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            chunk, self.sent = self.text[self.sent : upto], upto
            try:
                self.on_text(chunk)
            except Exception:  # a listener never stops the answer
                log.exception("a text listener failed")


class _Seq:
    """A request in a slot: where its prompt is, its sampler, its answer so far."""

    def __init__(
        self, slot: int, req: Request, future: Future[Outcome], sampler: Any, submitted: float
    ) -> None:
        self.slot = slot
        self.req = req
        self.future = future
        self.sampler = sampler
        self.submitted = submitted
        self.admitted = time.monotonic()
        self.first = 0.0
        self.fed = 0  # prompt tokens in the KV cache
        self.pos = 0  # the next token's position
        self.pending = -1  # the token sampled last, to be fed at the next step
        self.row = -1  # where its logits are in the step's batch (-1: none this step)
        self.out = 0
        self.parallel = 1
        self.text = _Text(req.stop, req.on_text)


class Decoder:
    """Several requests of one loaded model decoded together (see the module's text)."""

    def __init__(self, llm: Any, slots: int, n_ctx: int, n_batch: int = 512) -> None:
        import llama_cpp

        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"llm_slots must be 1 to {MAX_SLOTS}, not {slots}")
        self._ll = llama_cpp
        self.slots = slots
        self.n_ctx = n_ctx  # each sequence's context
        self._n_batch = max(n_batch, slots)
        self._model = llm.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        params = llama_cpp.llama_context_default_params()
        own = llm.context_params
        for name in ("n_threads", "n_threads_batch", "offload_kqv", "type_k", "type_v"):
            setattr(params, name, getattr(own, name))
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = self._n_batch
        params.n_seq_max = slots
        # one KV cache for all the sequences: with a cache per sequence, slots reused in another
        # order than the first made every other round of 8 prompts decode at a third of the speed
        # (as if llama.cpp cut the batch into several passes); with one, every round ran alike.
        # No sequence can take another's room: each is held to n_ctx tokens when it is submitted
        params.kv_unified = True
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError(
                f"llama.cpp could not make a context of {slots} sequences x {n_ctx} tokens (out of "
                "memory?): lower llm_slots or the model's n_ctx"
            )
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[Request, Future[Outcome], Any, float]] = collections.deque()
        self._active: dict[int, _Seq] = {}
        self._free = list(range(slots - 1, -1, -1))
        self._closing = False
        self._freed = False
        self._thread = threading.Thread(target=self._run, name="mesh-llm-decoder", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the callers' side
    def submit(self, req: Request) -> Future[Outcome]:
        """Queue one request; the future ends with its Outcome (or its error)."""
        return self.submit_many([req])[0]

    def submit_many(self, reqs: Sequence[Request]) -> list[Future[Outcome]]:
        """Queue several at once: those that find a free slot start in the same step."""
        for req in reqs:
            if not req.tokens:
                raise ValueError("the prompt has no tokens")
            if len(req.tokens) + req.max_tokens > self.n_ctx:
                raise ValueError(
                    f"prompt is {len(req.tokens)} tokens and max_tokens {req.max_tokens}; a sequence "
                    f"holds {self.n_ctx}"
                )
        entries: list[tuple[Request, Future[Outcome], Any, float]] = []
        try:
            for req in reqs:
                entries.append((req, Future(), self._sampler(req), time.monotonic()))
        except ValueError:
            for _req, _fut, sampler, _t in entries:
                self._ll.llama_sampler_free(sampler)
            raise
        with self._cond:
            if self._closing:
                for _req, _fut, sampler, _t in entries:
                    self._ll.llama_sampler_free(sampler)
                raise DecoderClosed("the model's decoder is closed (the model was unloaded)")
            self._queue.extend(entries)
            self._cond.notify()
        return [fut for _req, fut, _s, _t in entries]

    def close(self) -> None:
        """Stop the thread, fail what has not ended, free the context. Safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if self._freed:
            return
        self._freed = True
        gone = DecoderClosed("the model was unloaded while the task ran")
        for seq in list(self._active.values()):
            self._end(seq, error=gone)
        while self._queue:
            _req, fut, sampler, _t = self._queue.popleft()
            self._ll.llama_sampler_free(sampler)
            if fut.set_running_or_notify_cancel():  # (one its caller cancelled is left so)
                fut.set_exception(gone)
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)

    def _sampler(self, req: Request) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if req.grammar is not None:
            grammar = ll.llama_sampler_init_grammar(
                self._vocab, req.grammar._grammar.encode("utf-8"), req.grammar._root.encode("utf-8")
            )
            if not grammar:
                ll.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the task's grammar")
            ll.llama_sampler_chain_add(chain, grammar)
        if req.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(40))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(0.95, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(0.05, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(req.temperature))
            seed = req.seed if req.seed >= 0 else ll.LLAMA_DEFAULT_SEED
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    # ----------------------------------------------------------------- the decoding thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._active:
                    self._cond.wait()
                if self._closing:
                    return
                while self._queue and self._free:
                    req, fut, sampler, submitted = self._queue.popleft()
                    if not fut.set_running_or_notify_cancel():
                        self._ll.llama_sampler_free(sampler)
                        continue
                    slot = self._free.pop()
                    self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
                    self._active[slot] = _Seq(slot, req, fut, sampler, submitted)
            try:
                self._step()
            except Exception as exc:  # a bug here must fail the requests, never hang them
                log.exception("the decoder's step failed")
                for seq in list(self._active.values()):
                    self._end(seq, error=exc)

    def _step(self) -> None:
        for seq in list(self._active.values()):
            if seq.req.halt.is_set():
                self._end(seq, finish="halted")
        if not self._active:
            return
        batch, n = self._batch, 0
        in_step = list(self._active.values())
        for seq in in_step:
            seq.row = -1
            if seq.pending >= 0:  # one token each for those decoding
                n = self._add(n, seq.pending, seq.pos, seq.slot, True)
                seq.row, seq.pending = n - 1, -1
                seq.pos += 1
        for seq in in_step:  # then prompts, as far as the batch has room
            while seq.fed < len(seq.req.tokens) and n < self._n_batch:
                last = seq.fed == len(seq.req.tokens) - 1
                n = self._add(n, seq.req.tokens[seq.fed], seq.fed, seq.slot, last)
                seq.fed += 1
                if last:
                    seq.row, seq.pos = n - 1, seq.fed
        batch.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, batch)
        if rc != 0:
            failed = RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens")
            for seq in in_step:
                self._end(seq, error=failed)
            return
        together = sum(1 for seq in in_step if seq.row >= 0)
        for seq in in_step:
            if seq.row >= 0:
                seq.parallel = max(seq.parallel, together)
                self._sampled(seq, self._ll.llama_sampler_sample(seq.sampler, self._ctx, seq.row))

    def _add(self, n: int, token: int, pos: int, slot: int, logits: bool) -> int:
        b = self._batch
        b.token[n] = token
        b.pos[n] = pos
        b.n_seq_id[n] = 1
        b.seq_id[n][0] = slot
        b.logits[n] = logits
        return n + 1

    def _sampled(self, seq: _Seq, token: int) -> None:
        if not seq.first:
            seq.first = time.monotonic()
            if seq.req.sampled is not None:
                seq.req.sampled.set()
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            self._end(seq, finish="stop")
            return
        seq.out += 1
        if seq.text.add(self._token_bytes(token)):
            self._end(seq, finish="stop")
        elif seq.out >= seq.req.max_tokens:
            self._end(seq, finish="length")
        else:
            seq.pending = token

    def _token_bytes(self, token: int) -> bytes:
        n = self._ll.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # longer than the buffer: grow it once
            self._piece = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def _end(self, seq: _Seq, finish: str = "", error: BaseException | None = None) -> None:
        self._active.pop(seq.slot, None)
        self._ll.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
        self._ll.llama_sampler_free(seq.sampler)
        with self._cond:
            self._free.append(seq.slot)
        if error is not None:
            seq.future.set_exception(error)
            return
        ended = time.monotonic()
        seq.future.set_result(
            Outcome(
                text=seq.text.finish(),
                tokens_out=seq.out,
                finish=finish,
                submitted=seq.submitted,
                admitted=seq.admitted,
                first=seq.first or ended,
                ended=ended,
                parallel=seq.parallel,
            )
        )


def open_decoder(loaded: Any, slots: int) -> Decoder:
    """A decoder of `slots` sequences for a loaded in-process LLM, each of its `n_ctx`."""
    llm = loaded.handle
    return Decoder(llm, slots, int(llm.n_ctx()), n_batch=max(int(llm.n_batch), slots))
