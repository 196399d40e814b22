"""serve.py, over loopback, with the openai client: answers equal generate()'s (what the CLI prints), streaming
joins to the same text, concurrent clients get their alone-answers, and each error comes in the OpenAI shape
with the server still answering after it. One server per module (uvicorn in a background thread)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from conftest import random_image

from generation import generate, make_processor
from serve import create_app
from utils import load_hf_model

KEY = "test-key"
MAX_TOKENS = 6


def _data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _messages(prompt: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    model, tokenizer = load_hf_model(ckpt, "cpu", progress=False)
    local = tmp_path_factory.mktemp("local_images")
    random_image(7).save(local / "img.png")
    app = create_app(model, tokenizer, api_key=KEY, max_batch_size=8, max_queue=32, max_body_mb=0.5,
                     allow_local_images=str(local))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    processor = make_processor(model, tokenizer)

    def alone(prompt, image, max_tokens=MAX_TOKENS):
        return generate(model, processor, prompt, image, max_new_tokens=max_tokens)[0]

    yield {"url": f"http://127.0.0.1:{port}", "alone": alone, "model_processor": (model, processor), "app": app,
           "local": local}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _ask(client, prompt, image, **kw):
    return client.chat.completions.create(model="paligemma", messages=_messages(prompt, _data_url(image)),
                                          max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


def test_answer_equals_generate_and_usage(server, client):
    image = random_image(1)
    reply = _ask(client, "caption en", image)
    assert reply.choices[0].message.content == server["alone"]("caption en", image)
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data]


def test_answer_equals_cli(server, client, capsys, ckpt, tmp_path):
    from conftest import cli_in_process

    image = random_image(2)
    image.save(tmp_path / "a.png")
    code, out, _ = cli_in_process(capsys, "--model_path", ckpt, "--prompt", "detect cat", "--image_file_path",
                                  tmp_path / "a.png", "--max_tokens_to_generate", MAX_TOKENS, "--json")
    assert code == 0
    record = json.loads(out)
    message = _ask(client, "detect cat", image).choices[0].message
    assert message.content == record["text"]
    extra = message.model_extra
    if "<loc" in record["text"]:
        assert extra["detections"] == record["boxes"] and extra["problems"] == record["problems"]


def test_stream_joins_to_the_answer(server, client):
    image = random_image(3)
    chunks = list(_ask(client, "caption en", image, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server["alone"]("caption en", image)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_local_image_inside_the_allowed_directory_only(server, client):
    from PIL import Image

    image = Image.open(server["local"] / "img.png")
    reply = client.chat.completions.create(model="paligemma", messages=_messages("caption en", "img.png"),
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == server["alone"]("caption en", image)
    with pytest.raises(openai.BadRequestError, match="outside"):
        client.chat.completions.create(model="paligemma", messages=_messages("caption en", "../../etc/passwd"))


def test_concurrent_clients_get_their_alone_answers(server, client):
    jobs = [(p, random_image(10 + i), 3 + i % 4) for i, p in enumerate(["caption en", "answer en what is it",
                                                                        "detect cat", "caption es"] * 2)]
    before = len(server["app"].state.batcher.batches_run)
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: _ask(client, j[0], j[1], max_tokens=j[2]), jobs))
    for (prompt, image, n), reply in zip(jobs, replies, strict=True):
        assert reply.choices[0].message.content == server["alone"](prompt, image, n)
    assert max(server["app"].state.batcher.batches_run[before:]) > 1  # some requests were batched together


def test_sampled_request_equals_generate_with_its_seed(server, client):
    image = random_image(4)
    reply = _ask(client, "caption en", image, temperature=0.8, top_p=0.9, seed=123)
    alone = generate(*server["model_processor"], "caption en", image, max_new_tokens=MAX_TOKENS, do_sample=True,
                     temperature=0.8, top_p=0.9, seed=123)[0]
    assert reply.choices[0].message.content == alone


def test_disconnected_stream_stops_its_batch(server):
    """A client that goes away mid-stream frees the worker: its (long) generation stops early."""
    batcher = server["app"].state.batcher
    before = batcher.abandoned
    conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=60)
    body = json.loads(_body())
    body.update(stream=True, max_tokens=4000)  # ~30 s of decoding if nothing stopped it
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    conn.close()
    deadline = time.monotonic() + 20
    while batcher.abandoned == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.abandoned == before + 1
    assert _raw(server, _body())[0] == 200


def _raw(server, body: bytes | None, key: str | None = KEY, path="/v1/chat/completions") -> tuple[int, dict]:
    """One request by http.client; a body the server refuses early (413) may break the pipe: the reply still counts."""
    conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=60)
    try:
        conn.putrequest("GET" if body is None else "POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body or b"")))
        if key is not None:
            conn.putheader("Authorization", f"Bearer {key}")
        conn.endheaders()
        try:
            conn.send(body or b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def _body(prompt="caption en", url=None, **extra) -> bytes:
    url = url if url is not None else _data_url(random_image(5))
    return json.dumps({"model": "paligemma", "messages": _messages(prompt, url), "max_tokens": 2, **extra}).encode()


@pytest.mark.parametrize("body, key, status, param", [
    (b"{not json", KEY, 400, None),
    (_body(url="data:image/png;base64,@@@"), KEY, 400, "messages"),
    (_body(url="data:image/png;base64," + base64.b64encode(b"not an image").decode()), KEY, 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}]}]}).encode(),
     KEY, 400, "messages"),
    (_body(url="https://example.com/cat.png"), KEY, 400, "messages"),
    (_body(temperature=-1), KEY, 400, "temperature"),
    (_body(top_p=0), KEY, 400, "top_p"),
    (_body(max_tokens=0), KEY, 400, "max_tokens"),
    (_body(seed=-3), KEY, 400, "seed"),
    (_body(max_tokens=10**6), KEY, 400, "max_tokens"),
    (_body(), None, 401, None),
    (_body(), "wrong", 401, None),
    (_body(url="data:image/png;base64," + "A" * 600_000), KEY, 413, None),
], ids=["json", "base64", "image", "no-image-part", "remote-url", "temperature", "top_p", "max_tokens", "seed",
        "positions", "no-key", "wrong-key", "too-big"])
def test_errors_in_openai_shape_and_server_survives(server, body, key, status, param):
    code, reply = _raw(server, body, key)
    assert code == status, reply
    assert set(reply["error"]) >= {"message", "type", "param"} and reply["error"]["param"] == param
    code, reply = _raw(server, _body())
    assert code == 200 and reply["choices"][0]["message"]["content"] == server["alone"]("caption en",
                                                                                        random_image(5), 2)


def test_full_queue_is_429(ckpt, server):
    batcher = server["app"].state.batcher
    limit, batcher.max_queue = batcher.max_queue, 0  # nothing may wait: the next request finds the queue full
    try:
        code, reply = _raw(server, _body())
    finally:
        batcher.max_queue = limit
    assert code == 429 and reply["error"]["type"] == "rate_limit_error"
    assert _raw(server, None, path="/health") == (200, {"status": "ok", "waiting": 0})


def test_detection_answer_carries_the_clis_boxes():
    """The extra fields, on an answer whose boxes are known by PaliGemma's rule (bin / 1023 * size)."""
    from serve import _message
    from serve_batching import Result

    text = "<loc0000><loc0000><loc1023><loc1023> cat ; <loc0100> dog"
    message = _message(Result(text, 1, 1, "stop"), random_image(1, size=(64, 48)), None)
    assert message["content"] == text
    assert message["detections"] == [{"label": "cat", "box": [0.0, 0.0, 64.0, 48.0], "loc": [0, 0, 1023, 1023]}]
    assert len(message["problems"]) == 1 and "segments" not in message


def test_segmentation_answer_carries_masks(tmp_path):
    """With the mask VAE, `segments` holds each mask as COCO RLE: decoded, it is big_vision's pasted mask."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as coco_mask
    from test_segmentation import GOLDEN, unpack, vae_arrays

    from segmentation import load_vae
    from serve import _message
    from serve_batching import Result

    with np.load(GOLDEN) as g:
        golden = dict(g)
    np.savez(tmp_path / "vae-oid.npz", **vae_arrays(golden))
    text, (w, h) = str(golden["paste_texts"][0]), (int(v) for v in golden["paste_sizes"][0])
    message = _message(Result(text, 1, 1, "stop"), Image.new("RGB", (w, h)), load_vae(tmp_path / "vae-oid.npz"))
    (segment,) = message["segments"]
    rle = {"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()}
    assert np.array_equal(coco_mask.decode(rle).astype(bool), unpack(golden["paste_mask_0"], h, w))
    assert message["problems"] == [] and len(message["detections"]) == 1
