"""A small Python client of the Tandem gRPC API (the CLI's `--server` commands use it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc


@dataclass
class StreamResult:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    error: str = ""
    usage: pb.Usage | None = None


def build_request(prompt: str | None = None, messages: Sequence[dict] | None = None,
                  token_ids: Sequence[int] | None = None, *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                  seed: int | None = None, stop: Sequence[str] = (), drafter: str = "",
                  client_request_id: str = "", ignore_eos: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest from plain Python values; unset sampling fields take the server's defaults."""
    sampling = pb.SamplingParams(top_k=top_k, stop=list(stop), ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    req = pb.GenerateRequest(sampling=sampling, drafter=drafter, client_request_id=client_request_id)
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    return req


class TandemClient:
    def __init__(self, address: str, api_key: str | None = None, root_certificates: bytes | None = None) -> None:
        self.address = address
        if root_certificates is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TandemStub(self.channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout_s, metadata=self._metadata)

    def generate(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> StreamResult:
        """Run a request to its end; the whole answer."""
        result = StreamResult()
        for message in self.stream(request, timeout_s):
            result.request_id = message.request_id
            if message.HasField("chunk"):
                result.token_ids += message.chunk.token_ids
                result.text += message.chunk.text
            else:
                result.finish_reason = message.complete.finish_reason
                result.error = message.complete.error
                result.usage = message.complete.usage
        return result

    def server_info(self, timeout_s: float = 10.0) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout_s, metadata=self._metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
