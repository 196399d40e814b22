"""The command line: answer a prompt about one image or many with a PaliGemma checkpoint.

    python inference.py --model_path DIR --prompt "caption en" --image_file_path img.jpg
    python inference.py --model_path google/paligemma-3b-mix-224 --prompt "detect cat ; dog" \
        --image_file_path photos/ --output_image drawn/           # one JSON line per image, boxes drawn

stdout carries only the answers (one image: the text, streamed; several: JSON Lines); progress bars and
diagnostics go to stderr. Flag checks and error messages live in cli_checks.py. The generation library lives in
generation.py; its names are re-exported here, so the seed's `from inference import generate, make_processor, ...`
keeps working.
"""

from __future__ import annotations

import json as _json  # main() has a --json flag
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from cli_checks import (  # noqa: F401 — ImageError, load_image: part of this module's API since the seed
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    ImageError,
    UsageError,
    check_batch_size,
    check_bool_flags,
    check_flags,
    check_run_flags,
    describe,
    expand_image_paths,
    load_image,
    log,
    one_line,
    output_image_paths,
    prepare_argv,
)
from generation import (  # noqa: F401 — re-exported: `from inference import ...` as before generation.py existed
    SamplingConfig,
    TextStream,
    auto_prefill_dtype,
    compiled_decode_step,
    decode_one_token,
    decode_text,
    generate,
    generate_ids,
    make_processor,
    prefill,
    sample_next_token,
)
from processing_paligemma import Detection, draw_detections, parse_detections, to_rgb
from utils import load_hf_model, resolve_device_dtype


def main(
    model_path: str | None = None,
    prompt: str = "",
    image_file_path: str | list[str] | None = None,
    max_tokens_to_generate: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.9,
    do_sample: bool = False,
    only_cpu: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    top_k: int = 0,
    seed: int | None = None,
    debug: bool = False,
    stream: bool = True,
    json: bool = False,
    output_image: str | None = None,
    batch_size: int = 8,
    verbose: bool = False,
    compile: bool = False,
) -> None:
    """Answer a prompt about one image or many with a PaliGemma checkpoint; stdout carries only the answers.

    One image: the answer as plain text, streamed as it is generated (--json: one JSON object). Several images,
    a directory or a glob: one JSON line per image in input order, {"path", "text", "boxes", "problems"} or
    {"path", "error"}; a bar on stderr. "boxes" are the detection answer's boxes in the image's pixels.

    Args:
        model_path: checkpoint directory in the Hugging Face layout (config.json, *.safetensors, tokenizer), or a
            hub id such as google/paligemma-3b-mix-224 (downloaded into / read from the Hugging Face cache).
        prompt: task prompt, e.g. "caption en", "answer en what is this?", "detect cat ; dog" ("" is valid).
        image_file_path: the image to ask about; or several files, a directory, or a quoted glob ("imgs/*.jpg").
        max_tokens_to_generate: most new tokens to generate (stops earlier at EOS).
        temperature: sampling temperature (used with --do_sample True; 0 means greedy).
        top_p: nucleus sampling threshold in (0, 1].
        do_sample: sample instead of greedy decoding.
        only_cpu: force the CPU even if CUDA/MPS is available.
        device: cpu, cuda, cuda:N or mps (default: CUDA, else MPS, else CPU).
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA/MPS).
        top_k: keep only the k most likely tokens when sampling (0 = off).
        seed: random seed for sampling, for reproducible output.
        debug: show Python tracebacks instead of one-line errors.
        stream: one image, plain text: print the answer token by token as it is generated (default True).
        json: one image: print {"path", "text", "boxes", "problems"} as JSON instead of the plain answer.
        output_image: draw the detected boxes and labels: a file (.png, .jpg) for one image, an existing
            directory for several (each drawn as <name>.png).
        batch_size: images per forward pass when there are several (default 8).
        verbose: print load time, time to first token and tokens/s (images/s for several) to stderr.
        compile: CUDA only: compile the decode step into one CUDA graph per token (torch.compile); the first
            call compiles for a minute, so it pays for long answers and many images. Ignored elsewhere.

    Errors end in one stderr line starting with "error:" and exit code 2 (bad input), 1 (out of memory or a
    bug; --debug shows the traceback) or 130 (interrupted); see README "Errors". With several images an
    unreadable one gets an {"path", "error"} line, the rest still run, and the exit code is 2.
    """
    stage = "checking the flags"
    failed = 0
    try:
        check_flags(max_tokens_to_generate, temperature, top_p, top_k, do_sample, only_cpu)
        check_run_flags(model_path, image_file_path, device, only_cpu, seed, debug)
        check_bool_flags(stream=stream, json=json, verbose=verbose, compile=compile)
        check_batch_size(batch_size)
        paths, many = expand_image_paths(image_file_path)
        drawings = output_image_paths(output_image, paths, many)
        dev, dt = resolve_device_dtype("cpu" if only_cpu else device, dtype)
        if compile and dev.type != "cuda":
            log(f"note: --compile pays only on CUDA (CUDA graphs); running eager on {dev.type}")
            compile = False
        if dev.type == "cpu" and dt == torch.float16:
            log("note: float16 on CPU works but is slow (no fast float16 CPU kernels); float32 or bfloat16 is faster")
        if not many:
            stage = "reading the image"
            image = load_image(paths[0])  # before the model: a bad image should not cost a long load
        stage = "loading the model"
        started = time.perf_counter()
        model, tokenizer = load_hf_model(str(model_path), dev, dt, pack=None)  # packs where it pays
        log(f"loaded {model_path} on {model.device} as {model.dtype}")
        stats = _Stats(time.perf_counter() - started, model.config.eos_token_id) if verbose else None
        stage = "generating"
        processor = make_processor(model, tokenizer)
        settings = (max_tokens_to_generate, do_sample, temperature, top_p, top_k, seed, compile)
        if many:
            failed = _answer_many(model, processor, str(prompt), paths, batch_size, settings, drawings, stats)
        else:
            _answer_one(model, processor, str(prompt), paths[0], image, settings, stream and not json, json,
                        drawings and drawings[0], stats)
        if stats is not None:
            stats.report(many)
    except BaseException as e:  # noqa: BLE001 — every failure becomes one line; --debug shows the traceback
        # SystemExit passes; a closed stdout goes to cli()'s handler, which knows how to exit quietly.
        if debug is True or isinstance(e, (SystemExit, BrokenPipeError)):
            raise
        code, message = describe(e, stage)
        log(f"error: {message}")
        sys.exit(code)
    if failed:
        log(f"error: {failed} of {len(paths)} images could not be read; their JSON lines on stdout say why")
        sys.exit(EXIT_BAD_INPUT)


def _answer_one(model, processor, prompt, path, image, settings, stream, as_json, drawing, stats) -> None:
    """One image: the plain answer (streamed, or all at the end) or one JSON object; the drawing if asked for."""
    shown: list[str] = []
    text = _generate(model, processor, [prompt], [image], settings, stats, _show(shown) if stream else None)[0]
    if as_json or drawing:
        boxes, problems = parse_detections(text, *image.size)
    if drawing:
        draw_detections(image, boxes).save(drawing)
        log(f"note: drew {len(boxes)} box{'es' * (len(boxes) != 1)} on {drawing}")
        for problem in problems:
            log(f"note: {problem}")
    if as_json:
        print(_json.dumps(_record(path, text, boxes, problems), ensure_ascii=False))
    else:
        done = "".join(shown)
        print(text[len(done):] if text.startswith(done) else "")  # the rest (all of it when not streamed), "\n"


def _answer_many(model, processor, prompt, paths, batch_size, settings, drawings, stats) -> int:
    """Several images, batch_size at a time: one JSON line per image in input order. Returns how many failed."""
    failed = 0
    with tqdm(total=len(paths), desc="images", unit="image", file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images: dict[int, Image.Image] = {}
            records: dict[int, dict] = {}
            for i, path in enumerate(chunk):
                try:  # an image that cannot be read or converted gets its error line; the others go on
                    images[i] = to_rgb(load_image(path))
                except (ValueError, OSError) as e:
                    records[i] = {"path": path, "error": one_line(e)}
            if images:
                rows = list(images)
                texts = _generate(model, processor, [prompt] * len(rows), [images[i] for i in rows], settings, stats)
                for i, text in zip(rows, texts, strict=True):
                    boxes, problems = parse_detections(text, *images[i].size)
                    records[i] = _record(chunk[i], text, boxes, problems)
                    if drawings:
                        draw_detections(images[i], boxes).save(drawings[start + i])
            for i in range(len(chunk)):
                print(_json.dumps(records[i], ensure_ascii=False), flush=True)
                failed += "error" in records[i]
            bar.update(len(chunk))
    return failed


def _generate(model, processor, prompts, images, settings, stats, on_text=None) -> list[str]:
    """generate() with the CLI's settings, timed for --verbose when stats is given."""
    *sampling, compile = settings
    if stats is None:
        return generate(model, processor, prompts, images, *sampling, None, on_text, compile)
    stats.begin(len(prompts))
    texts = generate(model, processor, prompts, images, *sampling, stats.on_token, on_text, compile)
    stats.end()
    return texts


def _record(path: str, text: str, boxes: list[Detection], problems: list[str]) -> dict:
    return {"path": path, "text": text, "boxes": [b.to_json() for b in boxes], "problems": problems}


class _Stats:
    """--verbose: load time, time to first token, and decoding speed (tokens after each row's first, up to EOS)."""

    def __init__(self, load_s: float, eos_token_ids: Sequence[int]):
        self.load_s, self.eos = load_s, set(eos_token_ids)
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.tokens = self.images = self.batches = 0
        self.decode_s = 0.0

    def begin(self, rows: int) -> None:
        self.call_start, self.first_at, self.open_rows = time.perf_counter(), None, [True] * rows

    def on_token(self, token: torch.Tensor) -> None:
        step = token.tolist()  # waits for the device, so the times below are when tokens exist
        if self.first_at is None:
            self.first_at = time.perf_counter()
            if self.first_token_s is None:
                self.first_token_s = self.first_at - self.call_start
        else:
            self.tokens += sum(self.open_rows)
        self.open_rows = [open_ and t not in self.eos for open_, t in zip(self.open_rows, step, strict=True)]

    def end(self) -> None:
        if self.first_at is not None:
            self.decode_s += time.perf_counter() - self.first_at
        self.images += len(self.open_rows)
        self.batches += 1

    def report(self, many: bool) -> None:
        log(f"note: load {self.load_s:.2f} s")
        if self.first_token_s is not None:
            log(f"note: first token {self.first_token_s:.3f} s (vision tower + prompt prefill"
                f"{' of the first batch' if many else ''})")
        rate = self.tokens / self.decode_s if self.decode_s > 0 else 0.0
        log(f"note: {self.tokens} more tokens in {self.decode_s:.2f} s: {rate:.1f} tokens/s")
        if many:
            total = time.perf_counter() - self.started
            log(f"note: {self.images} images in {self.batches} batch{'es' * (self.batches != 1)}, {total:.2f} s: "
                f"{self.images / total:.2f} images/s")


def _show(shown: list[str]) -> Callable[[str], None]:
    """on_text for streaming to stdout: each piece written and flushed at once, and remembered in `shown`."""
    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
        shown.append(piece)
    return show


def cli(argv: list[str] | None = None) -> None:
    """The command line: flag names checked here, values parsed by fire, every failure one "error:" line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = prepare_argv(argv, main)
    except UsageError as e:
        log(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    import fire

    try:
        fire.Fire(main, command=argv, name="inference.py")
        sys.stdout.flush()  # a block-buffered stdout would otherwise fail only at exit, outside this handler
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — keeps the interpreter's final flush quiet
        log("error: stdout was closed before the answer was written (e.g. piped into head)")
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    cli()
