"""serve.py, over loopback, with the openai client: answers equal generate()'s (what the CLI prints), streaming
joins to the same text, concurrent clients get their alone-answers, and each error comes in the OpenAI shape
with the server still answering after it. One server per module (uvicorn in a background thread)."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn
from conftest import random_image

import serve_batching
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
    (b"[" * 100_000, KEY, 400, None),
    (_body(url="img\x00.png"), KEY, 400, "messages"),
    (_body(url="~nosuchuser1234/x.png"), KEY, 400, "messages"),  # not the server's "~": a relative name
    (_body(n=True), KEY, 400, "n"),
    (_body(n=1.0), KEY, 400, "n"),
    (_body(stop=5), KEY, 400, "stop"),
    (_body(stop=["a", "b", "c", "d", "e"]), KEY, 400, "stop"),
    (_body(stop=[""]), KEY, 400, "stop"),
], ids=["json", "base64", "image", "no-image-part", "remote-url", "temperature", "top_p", "max_tokens", "seed",
        "positions", "no-key", "wrong-key", "too-big", "nested-json", "nul-in-path", "tilde-user", "n-true", "n-float",
        "stop-type", "stop-count", "stop-empty"])
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
    message = _message(Result(text, 1, 1, "stop"), (64, 48), None)
    assert message["content"] == text
    assert message["detections"] == [{"label": "cat", "box": [0.0, 0.0, 64.0, 48.0], "loc": [0, 0, 1023, 1023]}]
    assert len(message["problems"]) == 1 and "segments" not in message


def test_segmentation_answer_carries_masks(tmp_path):
    """With the mask VAE, `segments` holds each mask as COCO RLE: decoded, it is big_vision's pasted mask."""
    import numpy as np
    from pycocotools import mask as coco_mask
    from test_segmentation import GOLDEN, unpack, vae_arrays

    from segmentation import load_vae
    from serve import _message
    from serve_batching import Result

    with np.load(GOLDEN) as g:
        golden = dict(g)
    np.savez(tmp_path / "vae-oid.npz", **vae_arrays(golden))
    text, (w, h) = str(golden["paste_texts"][0]), (int(v) for v in golden["paste_sizes"][0])
    message = _message(Result(text, 1, 1, "stop"), (w, h), load_vae(tmp_path / "vae-oid.npz"))
    (segment,) = message["segments"]
    rle = {"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()}
    assert np.array_equal(coco_mask.decode(rle).astype(bool), unpack(golden["paste_mask_0"], h, w))
    assert message["problems"] == [] and len(message["detections"]) == 1


def test_image_errors_in_the_clients_words(server):
    """A local path is named as the client sent it (never the server's own path), a data URL as "the image data";
    no advice about the CLI's flags."""
    code, reply = _raw(server, _body(url="nope.png"))
    message = reply["error"]["message"]
    assert code == 400 and message.startswith("image 'nope.png' does not exist"), message
    assert str(server["local"]) not in message and "--" not in message
    code, reply = _raw(server, _body(url="data:image/png;base64,"))
    assert code == 400 and reply["error"]["message"].startswith("the image data is empty"), reply


def test_queued_image_is_held_at_the_models_size(server, client):
    """read_image keeps only what the model sees (image_size², RGB) and the original size: the pixels the model
    gets are the same, and so are the answer and the boxes, placed in the original image's pixels."""
    from processing_paligemma import parse_detections
    from serve import read_image

    processor = server["model_processor"][1]
    image = random_image(6, size=(300, 200), mode="RGBA")
    small, size = read_image(_data_url(image), None, processor.image_size)
    assert small.size == (processor.image_size,) * 2 and small.mode == "RGB" and size == (300, 200)
    assert torch.equal(processor("x", small)["pixel_values"], processor("x", image)["pixel_values"])
    message = _ask(client, "detect cat", image).choices[0].message
    assert message.content == server["alone"]("detect cat", image)
    assert message.model_extra["detections"] == [b.to_json() for b in parse_detections(message.content, 300, 200)[0]]


def test_long_prompts_are_refused_naming_the_prompt(server):
    """A prompt longer than any that fits is refused before it is tokenized; one that fills the positions alone
    blames the prompt, not max_tokens."""
    batcher = server["app"].state.batcher
    positions, longest = batcher.max_positions, max(map(len, batcher.processor.tokenizer.get_vocab()))
    code, reply = _raw(server, _body(prompt="a" * (positions * longest + 1)))
    assert code == 400 and reply["error"]["param"] == "messages" and "characters" in reply["error"]["message"]
    prompt = "a " * positions
    assert len(batcher.processor.prompt_ids(prompt)) >= positions
    code, reply = _raw(server, _body(prompt=prompt))
    assert code == 400 and reply["error"]["param"] == "messages" and "shorten the prompt" in reply["error"]["message"]


def test_tokenizing_leaves_the_event_loop_free(server, monkeypatch):
    """While one request's prompt is tokenized, /health still answers at once."""
    processor = server["app"].state.batcher.processor
    tokenize, slept = processor.prompt_ids, []

    def slow(prompt):
        if prompt == "caption slowly" and not slept:  # the handler's call (the worker tokenizes it again)
            slept.append(time.sleep(1.5))
        return tokenize(prompt)

    monkeypatch.setattr(processor, "prompt_ids", slow)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_raw, server, _body(prompt="caption slowly"))
        time.sleep(0.3)
        start = time.monotonic()
        assert _raw(server, None, path="/health")[0] == 200
        assert time.monotonic() - start < 0.75
        assert answer.result()[0] == 200


def _open_request(server, stream: bool, max_tokens: int) -> http.client.HTTPConnection:
    """A chat request sent on a connection of its own, its reply not read yet (the test decides when to read or
    to hang up)."""
    conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=120)
    body = json.loads(_body())
    body.update(stream=stream, max_tokens=max_tokens)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn


def test_disconnected_clients_leave_the_queue(server):
    """Clients that go away while they wait free their places at once (/health and the max_queue check count only
    live requests), streaming or not."""
    batcher, send = server["app"].state.batcher, functools.partial(_open_request, server)

    def wait_for(waiting: int) -> bool:
        deadline = time.monotonic() + 5
        while batcher.waiting() != waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        return batcher.waiting() == waiting

    busy = send(True, 4000)  # keeps the worker busy: the next requests wait
    assert busy.getresponse().readline().startswith(b"data: ")
    try:
        for stream in (False, True):
            waiter = send(stream, 2)
            assert wait_for(1)
            waiter.sock.shutdown(socket.SHUT_RDWR)
            waiter.close()
            assert wait_for(0)
    finally:
        busy.close()  # its batch stops (test_disconnected_stream_stops_its_batch)


def test_a_batch_ends_when_its_only_long_row_loses_its_client(server, monkeypatch):
    """A (4000 tokens) and B (2) share a batch; A's client leaves: the batch ends once B is done, not after A's
    4000 steps for nobody. Counted in decode steps of that batch, not in seconds."""
    batcher, steps = server["app"].state.batcher, []
    real = serve_batching.generate_ids

    def counted(*args, on_token, **kwargs):
        seen = []
        steps.append(seen)
        return real(*args, on_token=lambda t: (seen.append(1), on_token(t)), **kwargs)

    monkeypatch.setattr(serve_batching, "generate_ids", counted)
    send = functools.partial(_open_request, server)
    busy = send(True, 4000)  # holds the worker, so A and B queue and then run together
    assert busy.getresponse().readline().startswith(b"data: ")
    a, b = send(False, 4000), send(False, 2)
    deadline = time.monotonic() + 10
    while batcher.waiting() != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    busy.close()  # its batch stops; A and B start
    while (batcher.waiting() != 0 or len(steps) < 2 or not steps[-1]) and time.monotonic() < deadline + 10:
        time.sleep(0.02)
    a.sock.shutdown(socket.SHUT_RDWR)
    a.close()
    reply = json.loads(b.getresponse().read())  # a row's answer comes when its batch ends
    assert reply["choices"][0]["message"]["content"] == server["alone"]("caption en", random_image(5), 2)
    assert len(steps[-1]) < 100, f"the batch decoded {len(steps[-1])} steps after its long row's client left"


def test_stop_strings_cut_the_answer(server, client):
    """The answer ends before the stop string, also when the stop string is split over streamed pieces, with
    finish_reason "stop"; the stream shows nothing past the cut."""
    image, pieces = random_image(2), []
    full = generate(*server["model_processor"], "caption en", image, max_new_tokens=12, on_text=pieces.append)[0]
    k = len(pieces) // 2
    stop = pieces[k - 1][-2:] + pieces[k][:2]  # across a piece boundary
    expected = full[:full.find(stop)]
    reply = _ask(client, "caption en", image, max_tokens=12, stop=["never in it", stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 12  # decoding stopped there
    chunks = list(_ask(client, "caption en", image, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_hold_back_a_possible_start():
    from serve_batching import StopStrings

    cut = StopStrings(["</s>"])
    assert [cut.push(p) for p in ["a<", "/", "x", "</", "s>tail", "more"]] == ["a", "", "</x", "", "", ""]
    assert cut.stopped and cut.text == "a</x" and cut.finish() == ""
    free = StopStrings(["</s>"])
    assert [free.push(p) for p in ["a</", "b"]] + [free.finish()] == ["a", "</b", ""]


def test_unknown_routes_and_model_retrieve_in_openai_shape(server, client):
    for body, path, status in [(None, "/nope", 404), (None, "/v1/chat/completions", 405),
                               (b"{}", "/v1/completions", 404)]:
        code, reply = _raw(server, body, path=path)
        assert code == status and set(reply["error"]) >= {"message", "type", "param", "code"}, reply
    assert client.models.retrieve("paligemma").id == "paligemma"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("argv, env", [(["--api_key", ""], None), ([], ""), (["--api_key", " key "], None)])
def test_empty_api_key_is_refused_at_startup(argv, env, monkeypatch, capsys):
    """An empty key would lock every client out: one error line, exit 2, before the model loads."""
    import serve

    monkeypatch.delenv("PALIGEMMA_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("PALIGEMMA_API_KEY", env)
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--model_path", "/nonexistent-checkpoint", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: the API key") and err.count("\n") == 1
