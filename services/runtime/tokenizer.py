"""Text <-> token ids, chat templates and stop tokens, over a Hugging Face fast tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.runtime.errors import InvalidRequestError

ChatMessage = dict[str, str]


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self.hf = hf_tokenizer
        eos = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def from_dir(cls, path: Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[ChatMessage], field: str = "messages") -> list[int]:
        """Token ids of the conversation with the assistant's turn opened."""
        validate_messages(messages, field)
        if not self.has_chat_template:
            raise InvalidRequestError(field, "this model has no chat template; send a raw prompt instead")
        ids = self.hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))


def validate_messages(messages: Any, field: str = "messages") -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(field, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{field}[{i}]", "expected an object with 'role' and 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"{field}[{i}].role", "expected 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"{field}[{i}].content", "expected a string")
