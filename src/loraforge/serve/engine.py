"""The serving engine: one base model, many adapters, continuous batching.

A background thread owns the model. Each step it (1) runs queued tasks (adapter load/unload),
(2) admits waiting requests while the batch has room and their adapter has (or gets) a kernel
slot, (3) prefills the admitted prompts (left-padded, grouped so that rows x longest prompt stays
within `prefill_tokens`; a prompt prefix already prefilled on the same adapter weights is read
from serve.prefix_cache) and samples their first token, then (4) runs one decode step for every
running sequence, each row with its own adapter (serve.kernel) and its own KV rows
(serve.kvcache). A prompt whose uncached part is longer than `prefill_chunk` tokens is prefilled
in pieces instead, at most `prefill_chunk` tokens of them per step, between decode steps (chunked
prefill): a 1,024-token prompt delays the running sequences' next tokens by one piece, not by the
whole prompt; it joins the batch when its last piece is done. Finished or
cancelled sequences leave between steps; new ones join. Other threads talk to it through
`submit`, `cancel` and `call`; results come back as Events through each request's sink.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from loraforge import LoraError, one_line
from loraforge.core.ops import lora_layers
from loraforge.models.generate import completion_text
from loraforge.serve.adapters import AdapterCache, AdapterRegistry
from loraforge.serve.constrain import Grammar, Matcher
from loraforge.serve.kernel import MultiLoraKernel
from loraforge.serve.kvcache import BatchCache, empty_batch, end_prefill, new_cache, stacked_past, start_prefill
from loraforge.serve.metrics import ServeMetrics
from loraforge.serve.prefix_cache import PrefixCache, past_kv

log = logging.getLogger("loraforge.serve")

# Tokens of a long prompt prefilled per engine step, between decode steps (chunked prefill, as
# vLLM's per-step token budget): smaller pieces delay the running sequences less, larger ones
# finish a long prompt in fewer steps.
DEFAULT_PREFILL_CHUNK = 512


def check_prefill_chunk(tokens, name: str = "prefill_chunk"):
    if not isinstance(tokens, int) or tokens < 0:
        raise LoraError(f"{name} must be a whole number of tokens >= 0 (0: prompts prefilled whole), got {tokens}")


class QueueFull(LoraError):
    """429: the waiting queue is full."""


class GenerationFailed(LoraError):
    """500: generating for a request failed (its sampling, its text, or the forward pass)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0: score the prompt only (prompt_logprobs), generate nothing
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # record each generated token's logprob and this many top tokens
    prompt_logprobs: int | None = None  # the same for every prompt token (from the prefill logits)
    grammar: Grammar | None = None  # structured output: each row's tokens held to it (serve.constrain)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (float32 log_softmax of the logits the sampler
    sees, before temperature and top-p) and the most likely tokens at its position. Both are None
    for the first prompt token, which nothing predicts."""

    token: int
    logprob: float | None
    top: dict[int, float] | None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class PartialPrefill:
    """A long prompt being prefilled a piece per step: its own one-row KV cache (every column
    kept, start_prefill) and how many of its tokens it holds."""
    seq: "Sequence"
    key: tuple
    cache: object
    done: int
    logits: list = field(default_factory=list)  # a scoring request's logits of every position, piece by piece


@dataclass
class Event:
    """What a request's sink receives: text deltas, then one `done` or `error`."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # `done`: prompt ones first, if asked


Sink = Callable[[Event], None]


class Sequence:
    """One request inside the engine."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, sink: Sink):
        self.id = next(self._ids)
        self.request, self.sink, self.params = request, sink, request.params
        self.prompt = list(request.prompt_ids)
        self.generated: list[int] = []
        self.text_ids: list[int] = []  # generated ids that count as text (not eos)
        self.logprobs: list[TokenLogprob] = []  # prompt tokens (if asked), then generated tokens
        self.sent = 0  # characters of decoded text already sent
        self.slot = 0
        self.pinned = False
        self.cancelled = False
        self.admitted = False
        self.finished = False
        self.arrival = time.perf_counter()
        self.last_token_at: float | None = None
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2 ** 64)  # any int: torch takes 64 bits
        grammar = self.params.grammar
        self.matcher: Matcher | None = grammar.matcher() if grammar is not None else None  # this row's own


class Engine:
    def __init__(self, model: nn.Module, tokenizer, registry: AdapterRegistry | None = None, max_batch: int = 16,
                 max_loaded: int = 8, max_queue: int = 256, prefill_tokens: int = 4096,
                 metrics: ServeMetrics | None = None, prefix_cache_mb: float = 0.0,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if max_batch < 1 or max_queue < 0:
            raise LoraError("max_batch must be >= 1 and max_queue >= 0")
        check_prefill_chunk(prefill_chunk)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or ServeMetrics()
        self.prefix = PrefixCache(int(prefix_cache_mb * 2 ** 20), self.metrics)  # 0 MB: disabled
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self.kernel = MultiLoraKernel(max_loaded)
        self.kernel.install([layer for _, layer in lora_layers(model)])
        self.adapters = AdapterCache(model, self.kernel, registry, self.metrics) if registry is not None else None
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        new_cache(model.config)  # refuses unsupported cache layouts early
        self.batch = empty_batch(model.config, self.device)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.in_batch = 0  # admitted and not finished (running, or being prefilled)
        self.prefilling: list[Sequence] = []
        self.partial: list[PartialPrefill] = []  # long prompts prefilled a piece per step (FIFO)
        self.tasks: list[tuple[Callable, Future]] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.on_token: Callable[[Sequence, float], None] | None = None  # per-token hook (benchmarks)

    # --- the thread-safe surface ---------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> Sequence:
        """Queue a request (QueueFull when the queue is full); events go to `sink`."""
        if len(request.prompt_ids) == 0:
            raise LoraError("the prompt is empty")
        seq = Sequence(request, sink)
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            room = self.max_queue + max(0, self.max_batch - self.in_batch)
            if len(self.waiting) >= room:
                self.metrics.rejected.inc()
                raise QueueFull(f"the request queue is full ({len(self.waiting)} waiting); retry later")
            self.waiting.append(seq)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cv.notify()
        return seq

    def cancel(self, seq: Sequence):
        """Stop generating for `seq` (its client went away): its batch row is freed next step."""
        with self.cv:
            seq.cancelled = True
            self.cv.notify()

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between steps; its result or exception lands in the Future."""
        future: Future = Future()
        with self.cv:
            self.tasks.append((fn, future))
            self.cv.notify()
        if self.thread is None:  # not started (tests, tools): run here
            self._run_tasks()
        return future

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0):
        """Abort what is left (after the HTTP server drained its requests) and end the thread."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self.running) + len(self.partial) + len(self.waiting)

    # --- the loop ------------------------------------------------------------------------
    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not (self.tasks or self.waiting or self.running or self.partial or self.stopping):
                    self.cv.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - keep serving; fail only what was in flight
                log.exception("engine step failed")
                self._fail_all(GenerationFailed(f"generation failed: {type(err).__name__}: {one_line(err)}"))
        self._run_tasks()
        self._fail_all(LoraError("the server is shutting down"))

    def step(self):
        """One engine iteration: tasks, cancellations, admission + prefill (whole prompts, then
        at most `prefill_chunk` tokens of the long ones), one decode step."""
        self._run_tasks()
        self._drop_cancelled()
        self.prefilling = self._admit()
        whole = []
        for seq in self.prefilling:
            if self._chunked(seq):
                self._start_partial(seq)
            else:
                whole.append(seq)
        for chunk in self._prefill_chunks(whole):
            self._prefill(chunk)
        self.prefilling = []
        self._prefill_pieces()
        if self.running:
            self._decode()
        self._update_gauges()

    def _run_tasks(self):
        with self.cv:
            tasks, self.tasks = self.tasks, []
        for fn, future in tasks:
            try:
                with torch.no_grad():
                    future.set_result(fn())
            except Exception as err:  # noqa: BLE001 - handed to the caller
                future.set_exception(err)

    # --- admission -------------------------------------------------------------------------
    def _admit(self) -> list[Sequence]:
        with self.cv:
            candidates = list(self.waiting)
        admitted = []
        for seq in candidates:
            if len(self.running) + len(self.partial) + len(admitted) >= self.max_batch:
                break
            if seq.cancelled:
                self._unqueue(seq)
                self._finish(seq, reason="abort")
            elif self._pin_adapter(seq):
                self._unqueue(seq)
                if not seq.finished:
                    seq.admitted = True
                    self.in_batch += 1
                    admitted.append(seq)
        return admitted

    def _unqueue(self, seq: Sequence):
        with self.cv:
            self.waiting.remove(seq)

    def _pin_adapter(self, seq: Sequence) -> bool:
        """Give seq its adapter slot; False when every slot is busy (it waits). A missing or
        broken adapter finishes seq with an error (True: it leaves the queue)."""
        name = seq.request.adapter
        if name is None:
            return True
        if self.adapters is None:
            self._finish(seq, error=LoraError(f"the model '{name}' does not exist"))
            return True
        try:
            with torch.no_grad():
                slot = self.adapters.acquire(name)
        except LoraError as err:
            self._finish(seq, error=err)
            return True
        except Exception as err:  # noqa: BLE001 - this request's adapter: fail this request only
            log.exception("adapter %r could not be made ready", name)
            self._finish(seq, error=row_error(err))
            return True
        if slot is None:
            return False
        seq.slot, seq.pinned = slot, True
        return True

    def _drop_cancelled(self):
        for seq in [s for s in self.waiting if s.cancelled]:
            self._unqueue(seq)
            self._finish(seq, reason="abort")
        keep = [i for i, s in enumerate(self.running) if not s.cancelled]
        for seq in self.running:
            if seq.cancelled:
                self._finish(seq, reason="abort")
        self._keep_rows(keep)
        for part in [p for p in self.partial if p.seq.cancelled]:
            self.partial.remove(part)
            self._finish(part.seq, reason="abort")

    # --- forward passes ----------------------------------------------------------------------
    def _prefill_chunks(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Split admitted sequences so that rows x longest prompt stays within the token budget.
        Sequences that score their prompt are prefilled apart: only their chunks keep the logits
        of every position (rows x width x vocab floats, within the same budget). Prompts with a
        cached prefix are prefilled apart from those without: in one chunk, the longest uncached
        part of any row sets the columns computed for all rows."""
        plain = [s for s in seqs if s.params.prompt_logprobs is None]
        scoring = [s for s in seqs if s.params.prompt_logprobs is not None]
        hit = [self._has_cached_prefix(s) for s in plain]
        cached = [s for s, h in zip(plain, hit) if h]
        cold = [s for s, h in zip(plain, hit) if not h]
        return self._budget_chunks(cached) + self._budget_chunks(cold) + self._budget_chunks(scoring)

    def _has_cached_prefix(self, seq: Sequence) -> bool:
        return self._cached_tokens(seq) > 0

    def _cached_tokens(self, seq: Sequence) -> int:
        if not self.prefix.enabled or seq.params.prompt_logprobs is not None:  # scoring reads no cache
            return 0
        return self.prefix.cached(self._adapter_key(seq), seq.prompt, len(seq.prompt) - 1)

    def _budget_chunks(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        chunks, current = [], []
        for seq in seqs:
            width = max([len(s.prompt) for s in current] + [len(seq.prompt)])
            if current and width * (len(current) + 1) > self.prefill_tokens:
                chunks.append(current)
                current = []
            current.append(seq)
        return chunks + ([current] if current else [])

    def _prefill(self, seqs: list[Sequence]):
        """Prefill `seqs` together; if that fails, each alone, so that a failure caused by one
        prompt fails that request only."""
        try:
            self._prefill_rows(seqs)
        except Exception as err:  # noqa: BLE001 - isolate the request that caused it
            if len(seqs) == 1:
                log.exception("prefill failed")
                self._finish(seqs[0], error=row_error(err))
                return
            for seq in seqs:
                if not seq.finished:
                    self._prefill([seq])

    def _prefill_rows(self, seqs: list[Sequence]):
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):  # left padding: the last column is every prompt's end
            ids[row, width - len(seq.prompt):] = torch.tensor(seq.prompt)
            mask[row, width - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        keys = [self._adapter_key(s) for s in seqs]
        past, cache = self._reuse_prefixes(seqs, keys, width)  # leading columns read from the prefix cache
        part = BatchCache(cache, mask)
        scoring = any(s.params.prompt_logprobs is not None for s in seqs)
        logits = self._forward(ids[:, past:], mask, positions[:, past:], part.cache, [s.slot for s in seqs],
                               every_position=scoring)
        self._join(seqs, keys, part, logits, width)

    def _join(self, seqs: list[Sequence], keys: list[tuple], part: BatchCache, logits: torch.Tensor, width: int):
        """After the prefill of `seqs` (KV in `part`, `width` columns; logits of every position when
        one of them scores its prompt, else of the last): offer the prompts to the prefix cache,
        set prompt logprobs, sample each row's first token, and move the rows that go on into the
        running batch."""
        self._cache_prompts(seqs, keys, part.cache)
        end_prefill(part.cache)
        for row, seq in enumerate(seqs):
            self.metrics.prompt_tokens.inc(len(seq.prompt))
            if seq.params.prompt_logprobs is not None:
                seq.logprobs = prompt_logprobs(logits[row, width - len(seq.prompt):], seq.prompt,
                                               seq.params.prompt_logprobs)
        rows = [row for row, seq in enumerate(seqs) if seq.params.max_tokens > 0]
        for seq in seqs:
            if seq.params.max_tokens == 0:
                self._finish(seq, reason="length")
        keep = [rows[i] for i in self._emit([seqs[row] for row in rows], logits[rows, -1])]
        part.keep(keep)
        if keep:
            self.batch.extend(part)
            self.running = self.running + [seqs[i] for i in keep]

    # --- chunked prefill ------------------------------------------------------------------------
    def _chunked(self, seq: Sequence) -> bool:
        """Whether seq's prompt is prefilled in pieces: its uncached part exceeds prefill_chunk."""
        if not self.prefill_chunk:
            return False
        return len(seq.prompt) - self._cached_tokens(seq) > self.prefill_chunk

    def _start_partial(self, seq: Sequence):
        """Queue seq's piecewise prefill, starting after the prefix the cache already holds."""
        try:
            key = self._adapter_key(seq)
            past, cache = self._reuse_prefixes([seq], [key], len(seq.prompt))
        except Exception as err:  # noqa: BLE001 - this request only
            log.exception("prefill failed")
            self._finish(seq, error=row_error(err))
            return
        self.partial.append(PartialPrefill(seq, key, cache, past))

    def _prefill_pieces(self):
        """Spend this step's budget of prefill_chunk tokens on the long prompts, oldest first."""
        budget = self.prefill_chunk
        while budget > 0 and self.partial:
            part = self.partial[0]
            n = min(budget, len(part.seq.prompt) - part.done)
            try:
                finished = self._prefill_piece(part, n)
            except Exception as err:  # noqa: BLE001 - this request's prompt: fail this request only
                log.exception("prefill failed")
                self.partial.remove(part)
                self._finish(part.seq, error=row_error(err))
                continue
            budget -= n
            if finished:
                self.partial.remove(part)

    def _prefill_piece(self, part: PartialPrefill, n: int) -> bool:
        """Prefill the next n tokens of part's prompt over its cache; on the last piece, join the
        batch (True)."""
        seq, start = part.seq, part.done
        end = start + n
        ids = torch.tensor([seq.prompt[start:end]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        scoring = seq.params.prompt_logprobs is not None
        logits = self._forward(ids, mask, positions, part.cache, [seq.slot], every_position=scoring)
        part.done = end
        if scoring:
            part.logits.append(logits[0])
        if end < len(seq.prompt):
            return False
        if scoring:
            logits = torch.cat(part.logits, dim=0)[None]
        self._join([seq], [part.key], BatchCache(part.cache, mask), logits, end)
        return True

    # --- the prefix cache ---------------------------------------------------------------------
    def _adapter_key(self, seq: Sequence) -> tuple:
        """What identifies the weights seq is served with: its adapter's name, registry version
        and the stamp of the files in its (pinned) slot; a reloaded adapter gets a new key."""
        name = seq.request.adapter
        if name is None or self.adapters is None:
            return ("base",)
        return (name, self.adapters.registry.version(name), self.adapters.loaded[name].stamp)

    def _reuse_prefixes(self, seqs: list[Sequence], keys: list[tuple], width: int) -> tuple[int, object]:
        """(past, cache): this prefill computes only its last `query` = width - past columns, the
        longest uncached part of any row (at least each prompt's last token, whose logits sample);
        `cache` holds the KV of the `past` columns before them: each row's first len(prompt) - query
        tokens from the prefix cache, left padded. Rows that score their prompt need the logits of
        every prompt position: their chunks read nothing (past 0) and only fill the cache."""
        cache = start_prefill(new_cache(self.model.config))
        if not self.prefix.enabled or any(s.params.prompt_logprobs is not None for s in seqs):
            return 0, cache
        found = [self.prefix.lookup(key, s.prompt, len(s.prompt) - 1) for s, key in zip(seqs, keys)]
        query = max(len(s.prompt) - len(blocks) * self.prefix.block for s, blocks in zip(seqs, found))
        for seq in seqs:
            self.prefix.record(max(0, len(seq.prompt) - query))
        if query == width:
            return 0, cache
        rows = [past_kv(blocks, len(s.prompt) - query) if len(s.prompt) > query else None
                for s, blocks in zip(seqs, found)]
        return width - query, stacked_past(cache, rows, width - query)

    def _cache_prompts(self, seqs: list[Sequence], keys: list[tuple], cache):
        """Offer each prompt's KV (right after its prefill: every layer's last columns are the
        prompts' ends) to the prefix cache."""
        if not self.prefix.enabled:
            return
        for row, (seq, key) in enumerate(zip(seqs, keys)):
            tails = [(layer.keys[row, :, -len(seq.prompt):], layer.values[row, :, -len(seq.prompt):])
                     for layer in cache.layers]
            self.prefix.insert(key, seq.prompt, tails)

    def _decode(self):
        ids = torch.tensor([[s.generated[-1]] for s in self.running], dtype=torch.long, device=self.device)
        mask = self.batch.step_mask()  # (B, T + 1)
        slots = [s.slot for s in self.running]
        logits = self._forward(ids, mask, self.batch.positions(), self.batch.cache, slots, reuse=True)
        self.batch.after_step(mask)
        self._keep_rows(self._emit(self.running, logits[:, -1]))

    def _forward(self, ids, mask, positions, cache, slots: list[int], reuse: bool = False,
                 every_position: bool = False) -> torch.Tensor:
        """One forward pass; returns float32 logits (B, T, vocab) of every position when asked,
        else (B, 1, vocab) of the last one."""
        self.kernel.set_rows(slots, reuse)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=0 if every_position else 1, **{self.cache_arg: cache})
        finally:
            self.kernel.reset_rows()
        return out.logits.float()

    def _keep_rows(self, keep: list[int]):
        if len(keep) != len(self.running):
            self.batch.keep(keep)
            self.running = [self.running[i] for i in keep]

    # --- tokens -> text -> events --------------------------------------------------------------
    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Sample one token per row, send text, finish rows that are done; returns rows to keep.
        A row whose sampling, grammar or text handling fails ends with an error; the other rows
        go on. A constrained row samples from its own masked copy of its logits (the others'
        logits are never touched) and ends ("stop") when its grammar does; logprobs are the
        model's, before the mask."""
        greedy = logits.argmax(dim=-1).tolist()
        broken = (logits.isnan() | logits.isposinf()).any(dim=-1).tolist()
        now = time.perf_counter()
        keep = []
        for row, seq in enumerate(seqs):
            self._time_token(seq, now)
            if self.on_token is not None:
                self.on_token(seq, now)
            try:
                if broken[row]:
                    raise LoraError("the model produced NaN or infinite logits for this request")
                if seq.matcher is not None:
                    token = constrained_token(logits[row], seq)
                else:
                    token = sample_token(logits[row], greedy[row], seq)
                if seq.params.logprobs is not None:
                    seq.logprobs.append(token_logprob(torch.log_softmax(logits[row], dim=-1), token,
                                                      seq.params.logprobs))
                alive = self._advance(seq, token)
                if alive and seq.matcher is not None and seq.matcher.ended:
                    self._send_text(seq, final=True)
                    alive = self._finish(seq, reason="stop")
            except Exception as err:  # noqa: BLE001 - this row's fault: end this row only
                log.warning("request %d failed: %s", seq.id, one_line(err), exc_info=not isinstance(err, LoraError))
                alive = self._finish(seq, error=row_error(err))
            if alive:
                keep.append(row)
        self.metrics.generated_tokens.inc(len(seqs))
        return keep

    def _time_token(self, seq: Sequence, now: float):
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.tpot.observe(now - seq.last_token_at)
        seq.last_token_at = now

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Add `token` to seq; send new text; False (and finish) when seq is done."""
        seq.generated.append(token)
        params = seq.params
        if token in self.eos_ids and not params.ignore_eos:
            self._send_text(seq, final=True)
            return self._finish(seq, reason="stop")
        seq.text_ids.append(token)
        if not self._send_text(seq, final=False):
            return self._finish(seq, reason="stop")
        if len(seq.generated) >= params.max_tokens or len(seq.prompt) + len(seq.generated) >= self.context:
            self._send_text(seq, final=True)
            return self._finish(seq, reason="length")
        return True

    def _send_text(self, seq: Sequence, final: bool) -> bool:
        """Send the decoded text not sent yet, holding back what may still become a stop string
        or an incomplete character. Returns False when a stop string was found (text cut there)."""
        text = completion_text(self.tokenizer, seq.text_ids)  # the rule generate and eval use too
        stop_at = find_stop(text, seq.params.stop, seq.sent)
        if stop_at is not None:
            text, final = text[:stop_at], True
        end = len(text) if final else len(text) - held_back(text, seq.params.stop)
        if end > seq.sent:
            seq.sink(Event("delta", text=text[seq.sent:end]))
            seq.sent = end
        return stop_at is None

    def _finish(self, seq: Sequence, reason: str | None = None, error: Exception | None = None) -> bool:
        """Send the final event once and unpin the adapter. Returns False (row leaves)."""
        if seq.finished:
            return False
        seq.finished = True
        if seq.admitted:
            self.in_batch -= 1
        if seq.pinned and self.adapters is not None:
            self.adapters.release(seq.request.adapter)
            seq.pinned = False
        model = seq.request.adapter or "base"
        if error is not None:
            self.metrics.requests.labels(model, "error").inc()
            seq.sink(Event("error", error=error))
        else:
            self.metrics.requests.labels(model, reason).inc()
            seq.sink(Event("done", finish_reason=reason, prompt_tokens=len(seq.prompt),
                           completion_tokens=len(seq.generated), logprobs=list(seq.logprobs)))
        return False

    def _fail_all(self, error: Exception):
        with self.cv:
            waiting, self.waiting = self.waiting, []
        for seq in waiting + self.prefilling + [p.seq for p in self.partial] + self.running:
            self._finish(seq, error=error)  # once per sequence: a finished one is skipped
        self.running, self.prefilling, self.partial, self.in_batch = [], [], [], 0
        self.batch = empty_batch(self.model.config, self.device)
        self._update_gauges()

    def _update_gauges(self):
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(self.in_batch)


def row_error(err: Exception) -> GenerationFailed:
    """What the client of a failed row is told: the cause in one line, never a traceback."""
    if isinstance(err, LoraError):
        return GenerationFailed(f"generation failed for this request: {one_line(err)}")
    return GenerationFailed(f"generation failed for this request: {type(err).__name__}: {one_line(err)}")


# --- sampling ----------------------------------------------------------------------------------
# Below this temperature, sampling is greedy: 1/T would overflow float32 (1/1e-39 is inf), and
# the distribution is already a point mass on the most likely token for any logits a model yields.
GREEDY_BELOW = 1e-4


def sample_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample `sample` of a request with `seed` (n > 1): sample 0 keeps the request's
    seed (n = 1 gives the same text as the first of n), the others get distinct seeds derived
    from it. None stays None (every sample draws its own random seed)."""
    if seed is None or sample == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_token(logits: torch.Tensor, greedy: int, seq: Sequence) -> int:
    """The next token of one row: greedy (argmax, given) for temperature ~0, else temperature +
    top-p sampling with the request's own generator (a seed makes it repeatable). Numerically
    safe for every temperature and top_p the API accepts. logits: (vocab,) float32, without
    NaN or +inf (the caller checks)."""
    p = seq.params
    if p.temperature < GREEDY_BELOW:
        return greedy
    row = logits.detach().float().cpu()
    scaled = (row - row.max()) / p.temperature  # <= 0 everywhere, 0 at the most likely token
    probs = top_p_filter(torch.softmax(scaled, dim=-1), p.top_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def constrained_token(logits: torch.Tensor, seq: Sequence) -> int:
    """The next token of a constrained row: sampled (or argmax) from its logits with the tokens
    its grammar forbids masked out; the row's matcher advances with it."""
    masked = seq.matcher.mask(logits)  # (vocab,), a copy
    token = sample_token(masked, int(masked.argmax()), seq)
    seq.matcher.accept(token)
    return token


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from one position's log-probabilities (vocab,), with the `top` best."""
    best = {}
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.numel()))
        best = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob]:
    """Entries for every prompt token from the prefill logits of its positions (len(prompt), vocab):
    position i predicts token i + 1; the first token has no prediction."""
    if not torch.isfinite(logits).all():
        raise LoraError("the model produced NaN or infinite logits for this prompt")
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1).cpu()
    return [TokenLogprob(prompt[0], None, None)] + [token_logprob(logprobs[i], token, top)
                                                     for i, token in enumerate(prompt[1:])]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling);
    the most likely token is always kept, so at least one token has mass."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    drop = sorted_probs.cumsum(0) - sorted_probs >= top_p  # mass before this token already enough
    drop[0] = False
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)


def find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index of the earliest stop string in text (searching from the unsent part), or None."""
    longest = max((len(s) for s in stops), default=0)
    start = max(0, sent - longest)
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text not to send yet: an incomplete UTF-8 character, or the
    longest tail that is the start of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


# --- model facts -------------------------------------------------------------------------------
def context_length(model: nn.Module) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def pad_token_id(tokenizer, eos_ids: set[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(eos_ids) if eos_ids else 0
