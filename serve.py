"""An OpenAI-compatible HTTP server for PaliGemma: chat completions with images, boxes and masks.

    python serve.py --model_path CKPT [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--max_batch_size 8]

POST /v1/chat/completions takes the last user message's text part (the PaliGemma prompt) and image_url part
(a data: URL; a local path only under --allow_local_images DIR). The answer text equals what inference.py prints
for the same image, prompt and settings; detection and segmentation answers also carry `detections` /
`segments` (the CLI's --json objects); `stop` strings cut the answer before the first one to appear.
`stream: true` sends OpenAI chunk Server-Sent Events ending in `data: [DONE]`. Built on FastAPI + uvicorn; the
model is loaded once and owned by serve_batching's worker thread. Checked by tests/test_serve.py with the
`openai` client against the CLI's answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from generation import SamplingConfig, make_processor
from image_files import ImageError, load_image
from processing_paligemma import ProcessorError, check_prompt, parse_detections, squash
from serve_batching import Batcher, Job, Result
from utils import DTYPES, load_hf_model


class ApiError(Exception):
    """An error answered in the OpenAI shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _setting(body: dict, name: str, default: Any) -> Any:
    value = body.get(name, default)
    return default if value is None else value


def parse_sampling(body: dict) -> SamplingConfig:
    """max_tokens, temperature, top_p, seed -> SamplingConfig; a value breaking SAMPLING_RULES is a 400 naming it.
    temperature defaults to 0 (greedy, as the CLI decodes by default); > 0 samples."""
    names = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
    values = {"max_tokens": _setting(body, "max_tokens", 100), "temperature": _setting(body, "temperature", 0.0),
              "top_p": _setting(body, "top_p", 1.0), "seed": body.get("seed")}
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:  # the newer name
        values["max_tokens"] = body["max_completion_tokens"]
    for ours, theirs in names.items():
        try:
            SamplingConfig(**{theirs: values[ours]})
        except ValueError as e:
            raise _bad(str(e).replace(theirs, ours, 1), ours) from None
    temperature = values["temperature"]
    return SamplingConfig(values["max_tokens"], do_sample=temperature > 0, temperature=float(temperature) or 1.0,
                          top_p=values["top_p"], seed=values["seed"])


MAX_STOPS, MAX_STOP_CHARS = 4, 1000  # OpenAI's count; the length bounds the worker's work per token


def parse_stop(body: dict) -> tuple[str, ...]:
    """`stop`: a string or a list of up to 4 (OpenAI's rule) -> the stop strings; 400 naming `stop` otherwise."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise _bad(f"'stop' must be a string or a list of up to {MAX_STOPS} strings, each 1 to {MAX_STOP_CHARS} "
                   "characters long", "stop")
    return tuple(stops)


def max_prompt_chars(tokenizer, max_positions: int) -> int:
    """The longest prompt, in characters, that could fit the model's positions. No token stands for more
    characters than the longest string in the vocabulary (added tokens included), so a longer prompt has more
    tokens than there are positions and is refused without tokenizing it (which takes seconds per megabyte).
    This holds for PaliGemma's tokenizers: their normalizer only turns " " into "▁" (it drops no character),
    and byte fallback spells an unknown character in byte tokens (no run of them fuses into one <unk>)."""
    return max_positions * max(map(len, tokenizer.get_vocab()))


def parse_messages(body: dict) -> tuple[str, str]:
    """The last user message -> (prompt text, image url). 400 for anything missing or of the wrong shape."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of chat messages", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise _bad("'messages' holds no user message", "messages")
    content = users[-1].get("content")
    if not isinstance(content, list):
        raise _bad("the last user message's content must be a list of parts: one {\"type\": \"text\"} (the "
                   "PaliGemma prompt) and one {\"type\": \"image_url\"}", "messages")
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    urls = [p.get("image_url") for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(texts) != 1 or len(urls) != 1:
        raise _bad(f"the last user message needs exactly one text part and one image_url part, got {len(texts)} "
                   f"and {len(urls)}", "messages")
    url = urls[0].get("url") if isinstance(urls[0], dict) else urls[0]
    if not isinstance(url, str) or not url:
        raise _bad("the image_url part needs {\"url\": \"data:image/...;base64,...\"}", "messages")
    try:
        return check_prompt(texts[0]), url
    except ProcessorError as e:
        raise _bad(str(e), "messages") from None


def read_image(url: str, local_root: Path | None, image_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """A data: URL (or, with --allow_local_images, a path inside that directory) -> (the image as the model sees
    it, its original (width, height)). Read by the CLI's load_image (same EXIF turn, decompression-bomb limit and
    errors, in the client's words). Never fetches a remote URL. Run it off the event loop: it decodes."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad("the image data URL must look like data:image/png;base64,...", "messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URL holds invalid base64", "messages") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "image")
            path.write_bytes(raw)
            return _for_model(_load(path, "the image data"), image_size)
    if local_root is None:
        raise _bad("image_url must be a data: URL (the server never fetches URLs; local paths need the server "
                   "started with --allow_local_images DIR)", "messages")
    shown = f"image {url!r}"
    try:
        # No expanduser: "~" would be the server's home (and "~nobody" a RuntimeError), not a client's folder.
        resolved = (local_root / Path(url.removeprefix("file://"))).resolve()
    except (ValueError, OSError) as e:  # a NUL byte in the path; a name the system cannot take
        raise _bad(f"{shown} is not a usable file path ({e})", "messages") from None
    # An absolute path replaces local_root; resolve() has followed ".." and links.
    if not resolved.is_relative_to(local_root):
        raise _bad(f"image path {url!r} is outside the directory the server may read", "messages")
    return _for_model(_load(resolved, shown), image_size)


def _load(path: Path, shown: str) -> Image.Image:
    """load_image, its errors in the client's words: `shown` for the file (not the server's own path) and no
    advice about the CLI's --image_file_path."""
    try:
        return load_image(str(path))
    except ImageError as e:
        message = str(e)
        for said in (f"image file {path}", f"image path {path}", str(path)):
            message = message.replace(said, shown)
        raise _bad(message.replace("; check --image_file_path", ""), "messages") from None


def _for_model(image: Image.Image, image_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """image -> (what the model sees of it, its original size): the processor's squash done now, so a queued
    request holds 150 KB (224 px) instead of the full decoded image (a 9400x9400 PNG: 265 MB). The processor's
    own squash then changes nothing, so the answer is the same; boxes and masks are placed with the original size."""
    try:
        return squash(image, image_size), image.size
    except (ValueError, OSError, TypeError) as e:  # the processor's words for a PIL mode with no RGB conversion
        raise _bad(f"cannot convert an image of mode {image.mode} to RGB ({e}); save it as RGB", "messages") from None


def _sendable(key: str) -> bool:
    """Whether a client can send `key` as 'Authorization: Bearer KEY': not empty, no spaces at its ends (HTTP
    drops them from a header's value)."""
    return bool(key) and key == key.strip()


def _message(result: Result, size: tuple[int, int], vae) -> dict:
    """The assistant message: the text, plus detections / segments in the image's pixels (size: its original
    (width, height)) as the CLI's --json builds them."""
    from segmentation import read_segments

    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if "<loc" in result.text:
        boxes, problems = parse_detections(result.text, *size)
        segments, seg_problems = read_segments(result.text, size, vae)  # no note: it names a CLI flag
        message["detections"] = [b.to_json() for b in boxes]
        message["problems"] = problems if segments is None else seg_problems
        if segments is not None:
            message["segments"] = [s.to_json() for s in segments]
    return message


def create_app(model, tokenizer, vae=None, api_key: str | None = None, max_batch_size: int = 8,
               max_queue: int = 64, max_body_mb: float = 20.0, allow_local_images: str | None = None,
               model_name: str = "paligemma") -> FastAPI:
    """The FastAPI app around a loaded model; its worker thread starts now and stops at app shutdown. api_key:
    None serves without a key; "" is refused (it would lock every client out)."""
    if api_key is not None and not (isinstance(api_key, str) and _sendable(api_key)):
        raise ValueError(f"api_key must be None (no key) or a non-empty string without spaces at its ends, got "
                         f"{api_key!r}")
    processor = make_processor(model, tokenizer)
    batcher = Batcher(model, processor, max_batch_size, max_queue)
    positions, prompt_chars = batcher.max_positions, max_prompt_chars(tokenizer, batcher.max_positions)
    local_root = Path(allow_local_images).resolve() if allow_local_images else None
    max_body = int(max_body_mb * 1024 * 1024)
    app = FastAPI(title="PaliGemma", on_shutdown=[batcher.close])
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)  # Starlette's own: no such route, or a method the route does not take
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        where, allow = f"{request.method} {request.url.path}", (exc.headers or {}).get("Allow")
        if exc.status_code == 404:
            message = (f"no such endpoint: {where}; this server answers POST /v1/chat/completions, GET /v1/models "
                       "and GET /health")
        elif exc.status_code == 405 and allow:
            message = f"{where} is not allowed; {request.url.path} takes {allow}"
        else:
            message = f"{where}: {exc.detail}"
        response = ApiError(exc.status_code, message).response()
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        # Constant time: compare_digest's time does not depend on where the strings first differ.
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error")

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, f"request body over the server's limit of {max_body_mb} MB (--max_body_mb)")
        raw = bytearray()
        try:
            async for chunk in request.stream():  # counted as it arrives: a chunked body cannot slip past the limit
                raw += chunk
                if len(raw) > max_body:
                    raise ApiError(413, f"request body over the server's limit of {max_body_mb} MB (--max_body_mb)")
        except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log
            raise ApiError(499, "the client disconnected while sending the request") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        except RecursionError:  # e.g. 100 000 "[": the parser recurses once per level
            raise _bad("the request body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "waiting": batcher.waiting()}

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "local"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # client.models.retrieve(id)
    async def model_card(model_id: str, request: Request) -> dict:
        check_key(request)
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           code="model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_body(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", "stream")
        n = body.get("n")
        if n is not None and (type(n) is not int or n != 1):  # not True or 1.0 either (a bool is an int)
            raise _bad(f"only n = 1 is supported (one answer per request), got {json.dumps(n)[:40]}", "n")
        sampling, stop = parse_sampling(body), parse_stop(body)
        prompt, url = parse_messages(body)
        if len(prompt) > prompt_chars:
            raise _bad(f"the prompt is {len(prompt)} characters: more tokens than the model's {positions} positions "
                       f"(no token is longer than {prompt_chars // positions} characters); shorten the prompt",
                       "messages")
        # Off the event loop: a long prompt takes seconds to tokenize, and every other client would wait.
        length = len(await asyncio.to_thread(processor.prompt_ids, prompt))
        if length >= positions:
            raise _bad(f"the prompt is {length} tokens with the image's {processor.num_image_tokens}, leaving none "
                       f"of the model's {positions} positions to answer in; shorten the prompt", "messages")
        if length + sampling.max_new_tokens > positions:
            raise _bad(f"the prompt ({length} tokens with the image's) + max_tokens {sampling.max_new_tokens} exceed "
                       f"the model's {positions} positions; lower max_tokens", "max_tokens")
        image, size = await asyncio.to_thread(read_image, url, local_root, processor.image_size)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future = loop.create_future()
        pieces: asyncio.Queue = asyncio.Queue()

        def done(outcome: Result | BaseException) -> None:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(outcome))

        def on_piece(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job = Job(prompt, image, sampling, done, on_piece if stream else None, length, stop)
        if not batcher.submit(job):
            raise ApiError(429, f"the server's queue is full ({max_queue} requests wait); retry later",
                           kind="rate_limit_error")
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": model_name}
        if stream:
            return StreamingResponse(_sse(job, finished, pieces, head, batcher.cancel),
                                     media_type="text/event-stream")
        result = await _wait(job, finished, request, batcher.cancel)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": _message(result, size, vae),
                             "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    return app


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _outcome(outcome: Result | BaseException) -> Result:
    if isinstance(outcome, ProcessorError):
        raise _bad(str(outcome), "messages")
    if isinstance(outcome, BaseException):
        raise ApiError(500, f"generation failed: {outcome}", kind="server_error")
    return outcome


async def _wait(job: Job, finished: asyncio.Future, request: Request, cancel: Callable[[Job], None]) -> Result:
    """The job's result; if the client disconnects first, the job is cancelled (its queue slot freed)."""
    while True:
        done, _ = await asyncio.wait({finished}, timeout=0.25)
        if done:
            return _outcome(finished.result())
        if await request.is_disconnected():
            cancel(job)
            raise ApiError(499, "client disconnected")


async def _sse(job: Job, finished: asyncio.Future, pieces: asyncio.Queue, head: dict,
               cancel: Callable[[Job], None]) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events: the role, each text piece, the finish reason with usage, [DONE]."""
    def event(delta: dict, finish: str | None = None, **extra: Any) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    getter: asyncio.Future | None = None
    try:
        yield event({"role": "assistant", "content": ""})
        while not (finished.done() and pieces.empty()):
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, finished}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield event({"content": getter.result()})
            else:
                getter.cancel()
        outcome = finished.result()
        if isinstance(outcome, BaseException):
            err = {"message": f"generation failed: {outcome}", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
        else:
            yield event({}, outcome.finish_reason, usage=_usage(outcome))
        yield "data: [DONE]\n\n"
    finally:
        if getter is not None:
            getter.cancel()  # the client went away while it waited: no pending task left behind
        if not finished.done():  # the client went away mid-stream: free its queue slot or its row
            cancel(job)


def main(argv: list[str] | None = None) -> None:
    """`python serve.py ...`: parse the flags, load the model once (a bad checkpoint: one "error:" line, exit 2),
    and serve until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="checkpoint directory (hub layout) or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("PALIGEMMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PALIGEMMA_API_KEY; none: no key)")
    parser.add_argument("--max_batch_size", type=int, default=8, help="most requests answered in one batch")
    parser.add_argument("--max_queue", type=int, default=64, help="most waiting requests; beyond it: 429")
    parser.add_argument("--max_body_mb", type=float, default=20.0, help="largest request body; beyond it: 413")
    parser.add_argument("--allow_local_images", metavar="DIR", help="let image_url name files inside DIR")
    parser.add_argument("--vae_path", help="vae-oid.npz for segmentation masks (default: one in the checkpoint)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: best available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on GPU")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue < 1 or args.max_body_mb <= 0:
        parser.error("--max_batch_size and --max_queue must be >= 1, --max_body_mb > 0")
    if args.api_key is not None and not _sendable(args.api_key):
        # An empty key (PALIGEMMA_API_KEY= ...) would lock every client out; spaces at its ends cannot be sent.
        parser.exit(2, "error: the API key (--api_key, or $PALIGEMMA_API_KEY) is empty or has spaces at its ends, "
                       "so no client could send it; give a real key, or unset PALIGEMMA_API_KEY to serve without "
                       "one\n")
    import uvicorn

    from segmentation import load_vae, resolve_vae_path

    try:
        model, tokenizer = load_hf_model(args.model_path, args.device, args.dtype, pack=None)
        vae_path = resolve_vae_path(args.vae_path, args.model_path)
        vae = load_vae(vae_path).to(model.device) if vae_path else None
    except ValueError as e:
        parser.exit(2, f"error: {' '.join(str(e).split())}\n")
    app = create_app(model, tokenizer, vae, args.api_key, args.max_batch_size, args.max_queue, args.max_body_mb,
                     args.allow_local_images, Path(str(args.model_path)).name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
