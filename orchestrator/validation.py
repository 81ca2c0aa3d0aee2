"""The edge: a `GenerateRequest` becomes a validated request, or an error naming its field.

Field names are the API's ("sampling.top_p", "chat.messages[1].role", "token_ids.ids[3]"),
so a client can find what to fix. Nothing from the client is evaluated or unpickled.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from orchestrator.backend import ModelCard
from services.runtime.errors import InvalidRequestError
from services.runtime.sampling_params import MAX_SEED, SamplingParams
from services.runtime.tokenizer import Tokenizer
from tandem.v1 import tandem_pb2 as pb

# GenerateRequest.drafter -> SamplingParams.speculation. The server's own drafter name means "auto".
SPECULATION_OF = {"": "auto", "auto": "auto", "fixed": "fixed", "none": "none"}


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 4 << 20
    """A larger GenerateRequest is INVALID_ARGUMENT, naming its largest field. (The transport refuses
    messages over twice this with RESOURCE_EXHAUSTED before they are read.)"""
    max_prompt_tokens: int | None = None
    """None: as many as the model's context leaves room for one generated token."""
    max_tokens: int | None = None
    """Cap on sampling.max_tokens; None: the model's context."""
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_images: int = 0
    """Images per request; 0 until an encode stage serves the model."""
    max_client_request_id_chars: int = 256


@dataclass(frozen=True)
class ValidRequest:
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    drafter: str
    idempotency_key: str | None
    priority: int
    images: list[bytes] = field(default_factory=list)
    prompt_kind: str = "text"  # "text", "chat" or "token_ids"


class RequestValidator:
    def __init__(self, card: ModelCard, tokenizer: Tokenizer, limits: RequestLimits = RequestLimits()) -> None:
        self.card = card
        self.tokenizer = tokenizer
        self.limits = limits

    @property
    def drafters(self) -> tuple[str, ...]:
        """What `GenerateRequest.drafter` accepts on this server."""
        return tuple(dict.fromkeys([*SPECULATION_OF, self.card.drafter]))

    def validate(self, req: pb.GenerateRequest) -> ValidRequest:
        """Raise InvalidRequestError naming the first bad field. Tokenizes the prompt (CPU work: call
        it off the event loop for long prompts)."""
        size = req.ByteSize()
        if size > self.limits.max_request_bytes:
            raise InvalidRequestError(_largest_field(req), f"the request is {size} bytes; this server takes at most "
                                      f"{self.limits.max_request_bytes}")
        if req.model and req.model != self.card.name:
            raise InvalidRequestError("model", f"unknown model {req.model!r}; this server serves {self.card.name!r}")
        if req.drafter not in self.drafters:
            raise InvalidRequestError("drafter", f"unknown drafter {req.drafter!r}; this server runs "
                                      f"{self.card.drafter!r}: send 'auto' (or empty), 'fixed' or 'none'")
        key = req.client_request_id or None
        if key is not None and len(key) > self.limits.max_client_request_id_chars:
            raise InvalidRequestError("client_request_id",
                                      f"at most {self.limits.max_client_request_id_chars} characters")
        if len(req.images) > self.limits.max_images:
            raise InvalidRequestError("images", f"at most {self.limits.max_images} images per request on this model")
        prompt_ids = self._prompt(req)
        params = self._params(req.sampling, len(prompt_ids), SPECULATION_OF.get(req.drafter, "auto"))
        return ValidRequest(self.card.name, prompt_ids, params, req.drafter or "auto", key, req.priority,
                            [img.data for img in req.images], req.WhichOneof("prompt"))

    def _prompt(self, req: pb.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("prompt")
        if kind == "text":
            if not req.text:
                raise InvalidRequestError("text", "expected a non-empty prompt")
            ids = self.tokenizer.encode(req.text)
        elif kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
            ids = self.tokenizer.apply_chat_template(messages, field="chat.messages")
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
            if not ids:
                raise InvalidRequestError("token_ids.ids", "expected a non-empty list of token ids")
            vocab = self.card.vocab_size
            for i, t in enumerate(ids):
                if t >= vocab:
                    raise InvalidRequestError(f"token_ids.ids[{i}]", f"expected a token id in [0, {vocab})")
        else:
            raise InvalidRequestError("prompt", "expected one of text, chat or token_ids")
        limit = self.card.max_model_len - 1
        if self.limits.max_prompt_tokens is not None:
            limit = min(limit, self.limits.max_prompt_tokens)
        if len(ids) > limit:
            raise InvalidRequestError(kind, f"the prompt is {len(ids)} tokens; this server takes at most {limit}")
        return ids

    def _params(self, s: pb.SamplingParams, prompt_tokens: int, speculation: str) -> SamplingParams:
        if len(s.stop) > self.limits.max_stop_strings:
            raise InvalidRequestError("sampling.stop", f"at most {self.limits.max_stop_strings} stop strings")
        for i, text in enumerate(s.stop):
            if len(text) > self.limits.max_stop_chars:
                raise InvalidRequestError(f"sampling.stop[{i}]", f"at most {self.limits.max_stop_chars} characters")
        room = self.card.max_model_len - prompt_tokens
        cap = room if self.limits.max_tokens is None else min(room, self.limits.max_tokens)
        max_tokens = s.max_tokens if s.HasField("max_tokens") else min(SamplingParams.max_tokens, cap)
        if max_tokens > cap:
            raise InvalidRequestError("sampling.max_tokens", f"{max_tokens} is more than the {cap} this prompt of "
                                      f"{prompt_tokens} tokens leaves room for")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature if s.HasField("temperature") else 0.0,
            top_k=s.top_k,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            # Drawn here when absent, so the store records it and a failover replays the same tokens.
            seed=s.seed if s.HasField("seed") else secrets.randbelow(MAX_SEED),
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            speculation=speculation,
        )
        try:
            params.validate(self.card.vocab_size)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"sampling.{e.field}", e.message) from None
        return params


def _largest_field(req: pb.GenerateRequest) -> str:
    sizes = {"text": len(req.text.encode()), "chat.messages": req.chat.ByteSize(),
             "token_ids.ids": req.token_ids.ByteSize(), "images": sum(i.ByteSize() for i in req.images),
             "sampling": req.sampling.ByteSize(), "client_request_id": len(req.client_request_id.encode())}
    return max(sizes, key=sizes.get)
