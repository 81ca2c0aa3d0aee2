"""`generate` and `stream` over `add_request` / `step` / `abort`: the same conveniences for an
engine in this process and for a deployment of stage workers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from services.runtime.request import RequestOutput
from services.runtime.sampling_params import SamplingParams


class StepLoop:
    def add_request(self, prompt: Any, params: SamplingParams = SamplingParams(), *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        raise NotImplementedError

    def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    def generate(self, prompts: Iterable[Any], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 ) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        prompts = list(prompts)
        per = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per)]
        final: dict[str, RequestOutput] = {}
        while any(i not in final for i in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: Any, params: SamplingParams = SamplingParams()) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they come (other requests advance too); aborted if
        the caller stops early."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)
