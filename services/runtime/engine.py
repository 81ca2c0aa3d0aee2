"""The engine: requests in, tokens out, one `step()` at a time.

`step()` is: schedule a batch, run the model over it, sample where a request has caught
up with its tokens, then append, detokenize, check stops and report. The later stages
(prefill, draft, verify workers) drive the same pieces.
"""

from __future__ import annotations

import secrets
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.runtime.block_manager import BlockManager
from services.runtime.detokenizer import IncrementalDetokenizer
from services.runtime.errors import InvalidRequestError, ResourceExhaustedError
from services.runtime.kv_cache import KVCache
from services.runtime.loader import LoadedModel, load_model
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.registry import DEFAULT_MODEL
from services.runtime.request import OutputCallback, Request, RequestOutput, RequestStatus
from services.runtime.sampler import sample
from services.runtime.sampling_params import MAX_SEED, SamplingParams
from services.runtime.scheduler import Scheduler, SchedulerConfig
from services.runtime.step_loop import StepLoop
from services.runtime.tokenizer import ChatMessage
from services.spec.config import SpecConfig
from services.spec.cost_model import StepCostModel, StepWork, seq_work
from services.spec.drafter import DraftContext, Drafter
from services.spec.registry import make_drafter
from services.spec.speculator import SpecStats, Speculator

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Prompt = str | Sequence[int] | Sequence[ChatMessage]


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    """A registered model name, a .gguf file or a Hugging Face model directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 1 << 30
    """Memory for the KV cache; sets the number of blocks unless num_kv_blocks is given."""
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    """Longest prompt + output; default the model's context, capped by the KV cache."""
    scheduler: SchedulerConfig = SchedulerConfig()
    enable_prefix_caching: bool = True
    speculation: SpecConfig = SpecConfig()
    handoff_lease_s: float = 60.0
    """How long a prefill engine holds a handed-off request's KV for its decode engine."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class HandOff:
    """A handed-off request's prompt KV, held until a decode engine has it (or the lease ends)."""

    block_table: list[int]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    seed: int
    expires_at: float


@dataclass
class EngineStats:
    """Running totals since the engine started (the metrics layer reads them)."""

    steps: int = 0
    forward_seconds: float = 0.0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0  # (request, step) pairs that committed tokens after a request's first
    decode_tokens: int = 0  # tokens those steps committed: decode_tokens / decode_steps is the MAT
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count


# Timing the calibration forwards takes seconds on a CPU: engines over the same weights in one
# process (a bench's engines, tests) measure once. Keyed by the module, forgotten with it.
_CALIBRATED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, StepCostModel]] = weakref.WeakKeyDictionary()


class LLMEngine(StepLoop):
    def __init__(self, config: EngineConfig = EngineConfig(), loaded: LoadedModel | None = None,
                 drafter: Drafter | None = None) -> None:
        """`drafter` overrides the one config.speculation names (tests hand in their own)."""
        self.config = config
        self.loaded = loaded or load_model(config.model, config.torch_dtype, config.device)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        dtype = next(self.loaded.model.parameters()).dtype
        num_blocks = config.num_kv_blocks or KVCache.blocks_for_budget(
            self.model_config, config.block_size, dtype, config.kv_cache_bytes
        )
        self.kv_cache = KVCache.allocate(self.model_config, num_blocks, config.block_size, dtype, config.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(self.loaded.model, self.kv_cache)
        capacity = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or capacity, self.model_config.effective_context, capacity)
        self.requests: dict[str, Request] = {}
        self.handoffs: dict[str, HandOff] = {}  # prompt KV held for a decode engine, by request id
        self.pending_kv: dict[str, Request] = {}  # prefilled elsewhere, waiting for their KV
        self.stats = EngineStats()
        spec = config.speculation
        self.speculator = None
        if drafter is None and spec.drafter != "none":
            ctx = DraftContext.of_engine(self.loaded, self.runner, self.block_manager)
            drafter = make_drafter(spec.drafter, ctx, spec)
        if drafter is not None:
            self.speculator = Speculator(drafter, spec)
            if spec.adaptive:
                self._calibrate_step_cost()

    # --- the API ---------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt, field: str = "prompt") -> list[int]:
        """Raw text, chat messages (the model's template applied) or token ids -> token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(field, "expected a non-empty prompt")
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if any(isinstance(m, dict) for m in items):
            return self.tokenizer.apply_chat_template(items, field="messages")
        if not items:
            raise InvalidRequestError(field, "expected a non-empty prompt")
        vocab = self.model_config.vocab_size
        for i, t in enumerate(items):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(f"{field}[{i}]", f"expected a token id in [0, {vocab})")
        return items

    def add_request(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, on_output: OutputCallback | None = None,
                    seed: int | None = None, hand_off: bool = False) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError (field named) on bad input.

        `seed` overrides params.seed (a deployment draws it once, so every stage and a
        failover replay sample alike); `hand_off` stops the request after its first token
        and holds its prompt KV for another engine to take (see take_handoff)."""
        req = self._new_request(prompt, params, request_id, on_output, seed)
        req.hand_off = hand_off
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def _new_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                     on_output: OutputCallback | None, seed: int | None) -> Request:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests or request_id in self.handoffs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params.validate(self.model_config.vocab_size)
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens leave no room to generate: the limit is {self.max_model_len} "
                "tokens of prompt and output together"
            )
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED)
        return Request(request_id, ids, params, seed, IncrementalDetokenizer(self.tokenizer, params.stop),
                       on_output)

    # --- disaggregation: one engine prefills, another decodes ------------------------------------
    def take_handoff(self, request_id: str) -> HandOff:
        """The prompt KV a handed-off request left behind; release_handoff() frees it once sent."""
        held = self.handoffs.get(request_id)
        if held is None:
            raise KeyError(f"no handed-off KV for request {request_id!r}")
        return held

    def release_handoff(self, request_id: str) -> bool:
        held = self.handoffs.pop(request_id, None)
        if held is not None:
            self.block_manager.free(held.block_table)
        return held is not None

    def expire_handoffs(self, now: float | None = None) -> list[str]:
        """Free handed-off KV whose lease ran out: a decode peer that died never strands blocks."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, h in self.handoffs.items() if h.expires_at <= now]
        for rid in expired:
            self.release_handoff(rid)
        return expired

    def add_prefilled(self, request_id: str, prompt_ids: Sequence[int], first_token: int,
                      params: SamplingParams, seed: int, on_output: OutputCallback | None = None) -> list[int]:
        """Admit a request another engine prefilled (and sampled the first token of). Returns
        the blocks its prompt KV must be written into; it decodes once activate() is called."""
        req = self._new_request(list(prompt_ids), params, request_id, on_output, seed)
        req.token_ids.append(first_token)
        req.detokenizer.push([first_token])  # the first token's text was streamed by the prefill stage
        req.first_token_time = time.monotonic()
        if not self.block_manager.allocate(req.block_table, req.num_prompt_tokens):
            raise ResourceExhaustedError(f"no KV blocks free for a {req.num_prompt_tokens}-token prompt")
        req.num_computed_tokens = req.num_prompt_tokens
        self.requests[request_id] = req
        self.pending_kv[request_id] = req
        return list(req.block_table)

    def activate(self, request_id: str) -> None:
        """The prefilled request's KV has arrived: it joins the running batch."""
        req = self.pending_kv.pop(request_id)
        req.status = RequestStatus.RUNNING
        self.scheduler.running.append(req)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks now. False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._report(req, [], "")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def speculation_counters(self) -> dict[str, float]:
        """Running totals behind MAT and acceptance rate (benchmarks and metrics take differences)."""
        spec = self.speculator.stats if self.speculator else SpecStats()
        return {"decode_steps": self.stats.decode_steps, "decode_tokens": self.stats.decode_tokens,
                "steps": self.stats.steps, "forward_seconds": self.stats.forward_seconds,
                "draft_seconds": spec.draft_seconds, "drafts": spec.drafts, "draft_tokens": spec.draft_tokens,
                "accepted_tokens": spec.accepted_tokens, "expected_accepted": spec.expected_accepted,
                "controlled_accepted": spec.controlled_accepted, "controlled_steps": spec.controlled_steps,
                "predicted_seconds": spec.predicted_seconds, "controlled_seconds": spec.controlled_seconds}

    def step(self) -> list[RequestOutput]:
        """Draft, schedule, run one forward pass, then sample or accept; returns this step's news."""
        started = time.perf_counter()
        forward_before = self.stats.forward_seconds
        draft_before = self.speculator.stats.draft_seconds if self.speculator is not None else 0.0
        outputs = self._step()
        if self.speculator is not None and self.stats.forward_seconds > forward_before:
            elapsed = time.perf_counter() - started
            # Drafting is not a fixed cost of every step: it grows with the batch and the offer,
            # and the draft gate prices it. Counted here, a costly drafting spell (a burst of
            # "fixed" requests) would make every draft node look cheap until it decayed.
            drafting = self.speculator.stats.draft_seconds - draft_before
            forward = self.stats.forward_seconds - forward_before
            self.speculator.step_done(forward, elapsed - forward - drafting)
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            decoding = [r for r in self.scheduler.running if r.num_computed_tokens == r.num_tokens - 1]
            # Prompts still waiting are this step's work too: a new arrival is admitted in it.
            prefilling = [r for r in self.scheduler.running if r.num_computed_tokens != r.num_tokens - 1]
            prefill = StepWork()
            for r in [*prefilling, *self.scheduler.waiting]:
                prefill += seq_work(r.num_tokens - r.num_computed_tokens, r.num_computed_tokens, 1)
            budget = self.config.scheduler.max_num_batched_tokens
            if prefill.tokens > budget:  # the step prefills only part of it
                share = budget / prefill.tokens
                prefill = StepWork(budget, round(prefill.context * share), round(prefill.pairs * share),
                                   round(prefill.rows * share))
            # Prefill first, under goodput control: while prompts wait, a step drafts no "auto" nodes,
            # so speculation never makes a new request wait longer for its first token.
            prefill_first = prefill.tokens and self.config.speculation.adaptive
            self.speculator.draft(decoding, self.max_model_len, prefill, max_total_nodes=0 if prefill_first else None)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        want_prompt_logits = self._want_prompt_logits(batch.requests)
        seqs = [self._seq_input(req, n, want_prompt_logits) for req, n in zip(batch.requests, batch.num_new_tokens)]
        started = time.perf_counter()
        out = self.runner.forward(seqs)
        elapsed = time.perf_counter() - started
        self.stats.forward_seconds += elapsed
        if self.speculator is not None:
            self.speculator.cost.observe(_forward_work(seqs, self.runner.last_calls), elapsed)
        self.stats.steps += 1
        self.stats.preemptions += len(batch.preempted)

        new_tokens: dict[str, list[int]] = {}
        to_sample: list[tuple[Request, torch.Tensor]] = []
        for req, n, logits in zip(batch.requests, batch.num_new_tokens, out.logits):
            if req.draft is not None:
                new_tokens[req.request_id] = self._accept_tree(req, logits)
                continue
            start = req.num_computed_tokens
            self.stats.prompt_tokens_computed += max(0, min(n, req.num_prompt_tokens - start))
            req.num_computed_tokens += n
            if want_prompt_logits and logits is not None and start < req.num_prompt_tokens:
                k = min(n, req.num_prompt_tokens - start)
                self.speculator.drafter.observe_prompt(req, start, req.token_ids[start:start + k], logits[:k])
            if req.num_computed_tokens == req.num_tokens:  # caught up: its next token is due
                to_sample.append((req, logits[-1:]))
        if to_sample:
            reqs = [r for r, _ in to_sample]
            logits = torch.cat([lg for _, lg in to_sample])
            tokens = sample(logits, [r.params for r in reqs], [r.seed for r in reqs], [r.num_tokens for r in reqs])
            for req, tok in zip(reqs, tokens):
                new_tokens[req.request_id] = [tok]
            decoding = [i for i, r in enumerate(reqs) if r.num_output_tokens > 0]  # not a prefill's first
            if self.speculator is not None and decoding:
                self.speculator.observe_plain_steps([reqs[i] for i in decoding], logits[decoding],
                                                    [tokens[i] for i in decoding])

        outputs = []
        for req in batch.requests:
            self.block_manager.commit_full_blocks(req.block_table, req.block_hashes, req.token_ids,
                                                  req.num_computed_tokens)
            if req.request_id in new_tokens:
                outputs.append(self._append_tokens(req, new_tokens[req.request_id]))
        return outputs

    def _want_prompt_logits(self, batch: Sequence[Request]) -> bool:
        """Logits at every prompt position, for a drafter that learns from them; optional ones
        only in steps that serve a lone request (the others would wait on the extra projection)."""
        drafter = self.speculator.drafter if self.speculator is not None else None
        if drafter is None or not drafter.wants_prompt_logits:
            return False
        return not drafter.prompt_logits_optional or len(batch) == 1

    def _calibrate_step_cost(self, context: int = 256, tokens: int = 64, seqs: int = 16) -> None:
        """Time forward passes on scratch blocks, seeding the goodput cost model: the linear terms
        (where the cache has room for `seqs` sequences of `context` + `tokens`), then the curve."""
        cost = self.speculator.cost
        key = (self.config.block_size, context, tokens, seqs)
        earlier = _CALIBRATED.setdefault(self.loaded.model, {}).get(key)
        if earlier is not None:
            cost.adopt(earlier)
            return
        tables: list[list[int]] = []
        try:
            for _ in range(seqs):
                table: list[int] = []
                if not self.block_manager.allocate(table, context + tokens):
                    break
                tables.append(table)
            dummy = [0] * tokens

            def time_forward(n_seqs: int, n: int, cached: int = 0, all_logits: bool = False) -> float:
                batch = [SeqInput(dummy[:n], cached, t, logits="all" if all_logits else "last")
                         for t in tables[:n_seqs]]
                started = time.perf_counter()
                self.runner.forward(batch)
                return time.perf_counter() - started

            if len(tables) == seqs:
                cost.measure_terms(time_forward, tokens, context, seqs)
            if tables:
                cost.calibrate(lambda n: time_forward(1, n))
                if len(tables) == seqs:
                    _CALIBRATED[self.loaded.model][key] = cost.measured()
        finally:
            for table in tables:
                self.block_manager.free(table)

    def _seq_input(self, req: Request, n: int, prompt_logits: bool) -> SeqInput:
        start = req.num_computed_tokens
        if req.draft is None:
            in_prompt = start < req.num_prompt_tokens
            return SeqInput(req.token_ids[start:start + n], start, req.block_table,
                            logits="all" if prompt_logits and in_prompt else "last")
        tree = req.draft  # the root (last committed token) and the nodes, positions by depth
        return SeqInput([req.token_ids[-1]] + tree.tokens, start, req.block_table,
                        positions=[start] + [start + d for d in tree.depths],
                        tree_mask=tree.attention_mask(), logits="all")

    def _accept_tree(self, req: Request, logits: torch.Tensor) -> list[int]:
        """Accept against the tree; keep the accepted path's KV in consecutive slots."""
        result = self.speculator.accept(req, logits)
        root = req.num_computed_tokens  # the root's KV sits here; node i's at root + 1 + i
        moves = [(root + 1 + node, root + 1 + j) for j, node in enumerate(result.accepted_nodes) if node != j]
        if moves:
            src, dst = zip(*moves)
            self.kv_cache.copy_slots(self._flat_slots(req, src), self._flat_slots(req, dst))
        req.num_computed_tokens = root + 1 + result.num_accepted
        req.draft = None
        return result.tokens

    def _flat_slots(self, req: Request, positions: Sequence[int]) -> torch.Tensor:
        bs = self.config.block_size
        return torch.tensor([req.block_table[p // bs] * bs + p % bs for p in positions], dtype=torch.long,
                            device=self.kv_cache.layers[0][0].device)

    # --- internals -------------------------------------------------------------------------------
    def _append_tokens(self, req: Request, tokens: list[int]) -> RequestOutput:
        """Commit tokens one by one, stopping at the first that ends the request."""
        decode_step = req.first_token_time is not None
        if not decode_step:
            req.first_token_time = time.monotonic()
        text = ""
        p = req.params
        status = None
        committed: list[int] = []
        for token in tokens:
            req.token_ids.append(token)
            committed.append(token)
            self.stats.generation_tokens += 1
            text += req.detokenizer.push([token])
            if req.detokenizer.stopped_by is not None:
                status = RequestStatus.FINISHED_STOPPED
            elif (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            elif req.hand_off:
                status = RequestStatus.HANDED_OFF
            if status is not None:
                break
        if decode_step:
            req.num_decode_steps += 1
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(committed)
        if status is not None:
            text += req.detokenizer.flush()
            self._finish(req, status)
        else:
            self.block_manager.truncate(req.block_table, req.num_tokens)  # drop slots of rejected nodes
        return self._report(req, committed, text)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if status == RequestStatus.HANDED_OFF:  # keep the prompt's blocks out of the free below
            table, req.block_table = req.block_table, []
            self.handoffs[req.request_id] = HandOff(table, req.num_prompt_tokens, req.seed,
                                                    time.monotonic() + self.config.handoff_lease_s)
        self.pending_kv.pop(req.request_id, None)
        req.status = status
        reason = status.finish_reason or "unknown"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        req.draft = None
        if self.speculator is not None:
            self.speculator.drafter.release(req)

    def _report(self, req: Request, new_tokens: list[int], new_text: str) -> RequestOutput:
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            token_ids=req.output_token_ids,
            text=req.detokenizer.text,
            finished=req.status.finished,
            finish_reason=req.status.finish_reason,
            prompt_tokens=req.num_prompt_tokens,
            cached_prompt_tokens=req.num_cached_tokens,
        )
        if req.on_output is not None:
            req.on_output(out)
        return out


def _forward_work(seqs: Sequence[SeqInput], calls: int = 1) -> StepWork:
    """What a pass over `seqs` computed, in `calls` attention calls per layer."""
    work = StepWork(calls=max(0, calls - 1))
    for s in seqs:
        n = len(s.token_ids)
        work += seq_work(n, s.start, n if s.logits == "all" else int(s.logits == "last"))
    return work
