"""Python client handles for a running ``kiln serve`` (OpenAI-compatible HTTP).

    from kiln.launch.client import KilnClient
    from kiln.runtime import SamplingParams

    c = KilnClient("http://127.0.0.1:8000", api_key=None)
    out = c.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    out.outputs[0].text, out.outputs[0].finish_reason
    for part in c.stream("Once upon a time", SamplingParams(max_tokens=32)):
        print(part.outputs[0].text)          # the text so far; the last part has finished=True
    c.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))

``AsyncKilnClient`` has the same methods as coroutines (``stream`` is an async iterator). Results
are ``RequestOutput`` objects as ``LLM.generate`` returns them; the HTTP API does not return
token ids, so ``token_ids`` stays empty and ``metrics`` carries the usage counts. A server error
raises ``KilnClientError`` with the server's message, HTTP status and code.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Iterator

import httpx

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import SamplingParams


class KilnClientError(RuntimeError):
    """An error answered by the server (or a broken connection)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def request_fields(params: SamplingParams | None) -> dict:
    """SamplingParams as the OpenAI-style fields the server accepts."""
    p = params or SamplingParams()
    body = {
        "n": p.n, "temperature": p.temperature, "top_p": p.top_p, "ignore_eos": p.ignore_eos,
        "skip_special_tokens": p.skip_special_tokens, "include_stop_str_in_output": p.include_stop_str_in_output,
    }
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    optional = {
        "top_k": p.top_k or None, "min_p": p.min_p or None, "seed": p.seed, "stop": p.stop or None,
        "stop_token_ids": p.stop_token_ids or None, "min_tokens": p.min_tokens or None,
        "repetition_penalty": p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        "presence_penalty": p.presence_penalty or None, "frequency_penalty": p.frequency_penalty or None,
        "response_format": p.response_format,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _error(resp: httpx.Response) -> KilnClientError:
    try:
        err = resp.json().get("error", {})
        return KilnClientError(f"{resp.status_code}: {err.get('message')}", resp.status_code, err.get("code"))
    except (ValueError, AttributeError):
        return KilnClientError(f"{resp.status_code}: {resp.text[:200]}", resp.status_code)


class _Builder:
    """Turns response bodies and stream chunks into RequestOutput objects."""

    def __init__(self, prompt, chat: bool):
        self.prompt = prompt if isinstance(prompt, str) else None
        self.prompt_ids = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else []
        self.chat = chat
        self.rid = ""
        self.texts: dict[int, str] = {}
        self.reasons: dict[int, str | None] = {}
        self.usage: dict = {}

    def _out(self, finished: bool, error: str | None = None) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=self.texts[i], token_ids=[], finish_reason=self.reasons.get(i))
                for i in sorted(self.texts)]
        return RequestOutput(request_id=self.rid, prompt=self.prompt, prompt_token_ids=self.prompt_ids, outputs=outs,
                             finished=finished, error=error, metrics={k: float(v) for k, v in self.usage.items()})

    def full(self, body: dict) -> RequestOutput:
        self.rid = body.get("id", "")
        for c in body.get("choices", []):
            i = c["index"]
            self.texts[i] = (c["message"]["content"] or "") if self.chat else c.get("text", "")
            self.reasons[i] = c.get("finish_reason")
        self.usage = body.get("usage") or {}
        return self._out(True)

    def chunk(self, body: dict) -> RequestOutput | None:
        if "error" in body:
            raise KilnClientError(f"stream error: {body['error'].get('message')}", None, body["error"].get("code"))
        self.rid = body.get("id", self.rid)
        if body.get("usage"):
            self.usage = body["usage"]
        for c in body.get("choices", []):
            i = c["index"]
            piece = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            self.texts[i] = self.texts.get(i, "") + (piece or "")
            if c.get("finish_reason") is not None:
                self.reasons[i] = c["finish_reason"]
        return self._out(False) if body.get("choices") else None

    def done(self) -> RequestOutput:
        return self._out(True)


def _sse_lines(line: str):
    """The JSON payload of one server-sent-events line, None for other lines, StopIteration at [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        raise StopIteration
    return json.loads(data)


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _body(self, prompt, params, chat: bool, stream: bool) -> tuple[str, dict]:
        body = request_fields(params)
        if self.model:
            body["model"] = self.model
        if params is not None and params.logprobs is not None:
            body.update({"logprobs": True, "top_logprobs": params.logprobs} if chat else {"logprobs": params.logprobs})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = prompt
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        return "/v1/completions", body


class KilnClient(_Base):
    """A synchronous handle for a ``kiln serve`` server."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        super().__init__(base_url, api_key, model, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _post(self, prompt, params, chat: bool) -> RequestOutput:
        path, body = self._body(prompt, params, chat, False)
        try:
            r = self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise KilnClientError(f"cannot reach {self.base_url}: {e}") from None
        if r.status_code != 200:
            raise _error(r)
        return _Builder(prompt, chat).full(r.json())

    def generate(self, prompt: str | list[int] | list[str], params: SamplingParams | None = None):
        """One RequestOutput for a prompt (text or token ids); a list of them for a list of text prompts."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return [self._post(p, params, False) for p in prompt]
        return self._post(prompt, params, False)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self._post(messages, params, True)

    def stream(self, prompt, params: SamplingParams | None = None, *, chat: bool = False) -> Iterator[RequestOutput]:
        """The output so far after every chunk; the last one has ``finished=True``."""
        path, body = self._body(prompt, params, chat, True)
        b = _Builder(prompt, chat)
        try:
            with self._http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise _error(r)
                for line in r.iter_lines():
                    try:
                        obj = _sse_lines(line)
                    except StopIteration:
                        break
                    if obj is not None:
                        out = b.chunk(obj)
                        if out is not None:
                            yield out
        except httpx.HTTPError as e:
            raise KilnClientError(f"stream from {self.base_url} broke: {e}") from None
        yield b.done()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "KilnClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncKilnClient(_Base):
    """The asyncio handle: the same methods as ``KilnClient``, awaited."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        super().__init__(base_url, api_key, model, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _post(self, prompt, params, chat: bool) -> RequestOutput:
        path, body = self._body(prompt, params, chat, False)
        try:
            r = await self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise KilnClientError(f"cannot reach {self.base_url}: {e}") from None
        if r.status_code != 200:
            raise _error(r)
        return _Builder(prompt, chat).full(r.json())

    async def generate(self, prompt, params: SamplingParams | None = None) -> RequestOutput:
        return await self._post(prompt, params, False)

    async def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return await self._post(messages, params, True)

    async def stream(self, prompt, params: SamplingParams | None = None, *, chat: bool = False) -> AsyncIterator[RequestOutput]:
        path, body = self._body(prompt, params, chat, True)
        b = _Builder(prompt, chat)
        try:
            async with self._http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _error(r)
                async for line in r.aiter_lines():
                    try:
                        obj = _sse_lines(line)
                    except StopIteration:
                        break
                    if obj is not None:
                        out = b.chunk(obj)
                        if out is not None:
                            yield out
        except httpx.HTTPError as e:
            raise KilnClientError(f"stream from {self.base_url} broke: {e}") from None
        yield b.done()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncKilnClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


__all__ = ["AsyncKilnClient", "KilnClient", "KilnClientError", "request_fields"]
