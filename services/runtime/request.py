"""One request's state inside an engine, and what the engine reports about it each step."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.runtime.detokenizer import IncrementalDetokenizer
from services.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.spec.tree import DraftTree


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Every status after PREEMPTED means finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    HANDED_OFF = 6  # prefilled here, decoding goes on in another engine (disaggregated serving)

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.HANDED_OFF: "handoff",
        }.get(self)


@dataclass
class RequestOutput:
    """A step's news about one request: the delta, and the totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]  # every generated token so far
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_prompt_tokens: int
    error: str | None = None  # why a request failed (finish_reason "error"), e.g. its worker died
    retryable: bool = False  # it failed through no fault of its own (its worker died): running prompt plus
    #                          tokens so far again elsewhere continues it exactly (randomness is keyed by position)


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer
    on_output: OutputCallback | None = None
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output, the sequence the KV describes
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full, committed blocks
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    draft: DraftTree | None = None  # this step's draft tree, set by the speculator before scheduling
    last_accepted: int | None = None  # draft tokens accepted at its last verified draft
    expected_accepted: float | None = None  # what the goodput controller expects its current draft to gain
    num_decode_steps: int = 0  # forward passes that produced output tokens after the first
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    hand_off: bool = False  # stop after the first token and hold the KV for another engine

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone; prompt and outputs so far will be prefilled again."""
        self.num_computed_tokens = 0
        self.block_hashes.clear()
        self.draft = None
        self.num_preemptions += 1
        self.status = RequestStatus.PREEMPTED
