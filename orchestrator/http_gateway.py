"""An OpenAI-compatible HTTP front on the gRPC API: /v1/models, /v1/completions, /v1/chat/completions
(streamed as server-sent events or not), /health and /metrics.

The gateway is a gRPC client of its own server (over a Unix socket the server also listens on),
so validation, admission, API keys and request state are the same for both front doors. The
client's `Authorization: Bearer` header is passed on as gRPC metadata. Defaults follow OpenAI's
(temperature 1, completions max_tokens 16); errors are OpenAI-style JSON with the field named.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.client import build_request
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

# gRPC status -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class BadRequest(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class HttpGateway:
    def __init__(self, grpc_target: str, metrics_registry=None, is_serving=lambda: True) -> None:
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.TandemStub(self.channel)
        self.metrics_registry = metrics_registry
        self.is_serving = is_serving
        self.app = web.Application(client_max_size=8 << 20)
        self.app.add_routes([
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.channel.close()

    # --- endpoints ---------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.is_serving() else 503, text="ok" if self.is_serving() else "draining")

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics_registry) if self.metrics_registry is not None else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        try:
            reply = await self.stub.ListModels(pb.ListModelsRequest(), metadata=_metadata(request))
        except grpc.aio.AioRpcError as e:
            return _grpc_error(e)
        return web.json_response({"object": "list", "data": [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "tandem", "max_model_len": m.max_model_len}
            for m in reply.models]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("body", "expected a JSON object")
            grpc_request = _to_grpc(body, chat)
            stream = bool(body.get("stream", False))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        except json.JSONDecodeError:
            return _error(400, "invalid_request_error", "body: expected JSON", "body")
        except BadRequest as e:
            return _error(400, "invalid_request_error", str(e), e.param)
        call = self.stub.Generate(grpc_request, metadata=_metadata(request))
        created, cid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = body.get("model") or ""
        try:
            first = await _first(call)  # errors before any token become an HTTP error status
        except grpc.aio.AioRpcError as e:
            return _grpc_error(e)
        if stream:
            return await self._stream(request, call, first, chat, cid, created, model, include_usage)
        text, reason, usage = "", "stop", None
        async for message in _chain(first, call):
            if message.HasField("chunk"):
                text += message.chunk.text
            else:
                reason, usage = message.complete.finish_reason, message.complete.usage
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _reason(reason)}
                  if chat else {"index": 0, "text": text, "finish_reason": _reason(reason), "logprobs": None})
        return web.json_response({"id": cid, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": model, "choices": [choice], "usage": _usage(usage)})

    async def _stream(self, request: web.Request, call, first, chat: bool, cid: str, created: int, model: str,
                      include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list[dict], usage: dict | None = None) -> None:
            event = {"id": cid, "object": kind, "created": created, "model": model, "choices": choices}
            if usage is not None:
                event["usage"] = usage
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        if chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            async for message in _chain(first, call):
                if message.HasField("chunk"):
                    if not message.chunk.text:
                        continue
                    delta = {"content": message.chunk.text}
                    await send([{"index": 0, "delta": delta, "finish_reason": None} if chat else
                                {"index": 0, "text": message.chunk.text, "finish_reason": None, "logprobs": None}])
                else:
                    reason = _reason(message.complete.finish_reason)
                    await send([{"index": 0, "delta": {}, "finish_reason": reason} if chat else
                                {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}])
                    if include_usage:
                        await send([], _usage(message.complete.usage))
        except grpc.aio.AioRpcError as e:
            await response.write(f"data: {json.dumps(_error_body(e))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _to_grpc(body: dict[str, Any], chat: bool) -> pb.GenerateRequest:
    if body.get("n", 1) != 1:
        raise BadRequest("n", "only n=1 is served")
    for unsupported in ("logprobs", "echo", "best_of", "tools", "functions"):
        if body.get(unsupported) not in (None, False, 0, []):
            raise BadRequest(unsupported, "not supported by this server")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop", "expected a string or a list of strings")
    sampling = {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens", None if chat else 16)),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
    }
    for name, value in sampling.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadRequest(name, "expected a number")
        if name in ("max_tokens", "seed") and value is not None and (not float(value).is_integer() or value < 0):
            raise BadRequest(name, "expected a non-negative integer")
    kw = {k: v for k, v in sampling.items() if v is not None}
    kw["max_tokens"] = int(kw["max_tokens"]) if "max_tokens" in kw else None
    if "seed" in kw:
        kw["seed"] = int(kw["seed"])
    top_k = body.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequest("top_k", "expected an integer >= 0")
    common = dict(stop=stop, top_k=top_k, ignore_eos=bool(body.get("ignore_eos", False)),
                  drafter=str(body.get("drafter", "")), **kw)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages", "expected a list of {role, content} objects")
        plain = [{"role": str(m.get("role", "")), "content": _content(m.get("content"), i)}
                 for i, m in enumerate(messages)]
        req = build_request(messages=plain, **common)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            req = build_request(prompt, **common)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            req = build_request(token_ids=prompt, **common)
        else:
            raise BadRequest("prompt", "expected a string or a list of token ids (one prompt per request)")
    if body.get("model"):
        req.model = str(body["model"])
    return req


def _content(content: Any, i: int) -> str:
    """Message content: a string, or text parts ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise BadRequest(f"messages[{i}].content", "expected a string or a list of text parts")


async def _first(call) -> pb.GenerateResponse | None:
    async for message in call:
        return message
    return None


async def _chain(first, call) -> AsyncIterator[pb.GenerateResponse]:
    if first is not None:
        yield first
    async for message in call:
        yield message


def _reason(finish_reason: str) -> str:
    return {"cancelled": "abort", "error": "error"}.get(finish_reason, finish_reason)


def _usage(usage: pb.Usage | None) -> dict[str, int]:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    auth = request.headers.get("Authorization")
    return (("authorization", auth),) if auth else ()


def _error_body(e: grpc.aio.AioRpcError) -> dict:
    _, kind = _HTTP.get(e.code(), (500, "server_error"))
    details = e.details() or e.code().name
    param = details.split(":", 1)[0] if e.code() == grpc.StatusCode.INVALID_ARGUMENT and ":" in details else None
    return {"error": {"message": details, "type": kind, "param": param, "code": e.code().name.lower()}}


def _grpc_error(e: grpc.aio.AioRpcError) -> web.Response:
    status, _ = _HTTP.get(e.code(), (500, "server_error"))
    body = _error_body(e)
    if body["error"]["param"] == "model":
        status = 404  # OpenAI answers an unknown model with 404
    return web.json_response(body, status=status)


def _error(status: int, kind: str, message: str, param: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status)
