"""The command line: answer a prompt about one image or many with a PaliGemma checkpoint.

    python inference.py --model_path DIR --prompt "caption en" --image_file_path img.jpg
    python inference.py --model_path google/paligemma-3b-mix-224 --prompt "detect cat ; dog" \
        --image_file_path photos/ --output_image drawn/           # one JSON line per image, boxes drawn

stdout carries only the answers (one image: the text, streamed; several: JSON Lines); progress bars and
diagnostics go to stderr. Every flag is declared once, in FLAGS below: argv parsing, the call into fire, main()'s
signature, the checks before the model loads and --help all come from that table (machinery in cli_checks.py).
The generation library lives in generation.py; its names are re-exported here, so the seed's
`from inference import generate, make_processor, ...` keeps working.
"""

from __future__ import annotations

import json as _json  # FLAGS has a --json flag
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from cli_checks import (  # noqa: F401 — ImageError, load_image: part of this module's API since the seed
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    Flag,
    ImageError,
    UsageError,
    args_doc,
    check_options,
    describe,
    expand_image_paths,
    fire_command,
    help_text,
    load_image,
    log,
    one_line,
    options_class,
    output_image_paths,
    parse_argv,
    signature_of,
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
from quantize import check_method
from utils import load_hf_model, resolve_device_dtype


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


# name, type, default, help, then: short form, metavar, what a missing required flag needs, what a value must be.
FLAGS: tuple[Flag, ...] = (
    Flag("model_path", str, None, "checkpoint directory in the Hugging Face layout (config.json, *.safetensors, "
         "tokenizer), or a hub id such as google/paligemma-3b-mix-224 (downloaded into / read from the Hugging "
         "Face cache).", metavar="PATH", required="the checkpoint directory (config.json, *.safetensors, tokenizer)"),
    Flag("prompt", str, "", 'task prompt, e.g. "caption en", "answer en what is this?", "detect cat ; dog" ("" is '
         "valid).", short="p"),
    Flag("image_file_path", list, None, 'the image to ask about; or several files, a directory, or a quoted glob '
         '("imgs/*.jpg").', short="i", metavar="IMAGE", required="the image to ask about"),
    Flag("max_tokens_to_generate", int, 100, "most new tokens to generate (stops earlier at EOS).",
         valid=("a positive integer", _at_least(1))),
    Flag("temperature", float, 0.8, "sampling temperature (used with --do_sample True; 0 means greedy).",
         valid=("a number >= 0", _at_least(0))),
    Flag("top_p", float, 0.9, "nucleus sampling threshold in (0, 1].", valid=("in (0, 1]", lambda v: 0 < v <= 1)),
    Flag("do_sample", bool, False, "sample instead of greedy decoding."),
    Flag("only_cpu", bool, False, "force the CPU even if CUDA/MPS is available."),
    Flag("device", str, None, "cpu, cuda, cuda:N or mps.", metavar="DEVICE",
         shown_default="CUDA, else MPS, else CPU"),
    Flag("dtype", str, None, "float32, bfloat16 or float16.", metavar="DTYPE",
         shown_default="float32 on CPU, bfloat16 on CUDA/MPS"),
    Flag("top_k", int, 0, "keep only the k most likely tokens when sampling (0 = off).",
         valid=("an integer >= 0", _at_least(0))),
    Flag("seed", int, None, "random seed for sampling, for reproducible output.", shown_default="a random seed",
         valid=("an integer >= 0", _at_least(0))),
    Flag("debug", bool, False, "show Python tracebacks instead of one-line errors."),
    Flag("stream", bool, True, "one image, plain text: print the answer token by token as it is generated."),
    Flag("json", bool, False, 'one image: print {"path", "text", "boxes", "problems"} as JSON instead of the plain '
         "answer.", short="j"),
    Flag("output_image", str, None, "draw the detected boxes and labels: a file (.png, .jpg) for one image, an "
         "existing directory for several (each drawn as <name>.png).", metavar="PATH", shown_default="no drawing"),
    Flag("batch_size", int, 8, "images per forward pass when there are several.", short="b",
         valid=("a positive integer", _at_least(1))),
    Flag("verbose", bool, False, "print load time, time to first token and tokens/s (images/s for several) to "
         "stderr.", short="v"),
    Flag("quantize", str, None, "int8: int8 weights with per-output-channel scales, quantized while loading a "
         "float checkpoint (half the bytes of bfloat16; faster CPU decode; logits move, see README). A checkpoint "
         "saved by quantize.py is int8 without this flag.", metavar="METHOD", shown_default="none"),
    Flag("compile", bool, False, "CUDA only: compile the decode step into one CUDA graph per token "
         "(torch.compile); the first call compiles for a while, so it pays for long answers and many images. "
         "Ignored elsewhere.", short="c"),
)

# The parsed command line: one frozen dataclass, a field per flag (model_path, prompt, ..., compile).
Options = options_class(FLAGS)

ABOUT = """\
Answer a prompt about one image or many with a PaliGemma checkpoint; stdout carries only the answers.

One image: the answer as plain text, streamed as it is generated (--json: one JSON object). Several images,
a directory or a glob: one JSON line per image in input order, {"path", "text", "boxes", "problems"} or
{"path", "error"}; a bar on stderr. "boxes" are the detection answer's boxes in the image's pixels."""

EXAMPLES = (
    'python inference.py --model_path google/paligemma-3b-mix-224 --prompt "caption en" --image_file_path cow.jpg',
    'python inference.py --model_path ckpt/ --prompt "answer en what is this?" -i cow.jpg --dtype bfloat16 --verbose',
    'python inference.py --model_path ckpt/ --prompt "detect cat ; dog" -i photos/ --output_image drawn/',
)

EXIT_CODES = """\
exit codes: 0 done; 2 bad input (a flag, an image, the checkpoint); 1 out of memory or a bug (--debug shows the
traceback); 130 interrupted. Every error is one stderr line starting with "error:" (docs/errors.md lists them).
With several images an unreadable one gets an {"path", "error"} line, the rest still run, and the exit code is 2."""


@dataclass(frozen=True)
class _Run:
    """What every answer of one invocation shares."""

    prompt: str
    sampling: SamplingConfig
    compile: bool
    stats: _Stats | None


def main(*args: Any, **flags: Any) -> None:
    """Answer a prompt about one image or many with a PaliGemma checkpoint; stdout carries only the answers.

    Called by fire with every flag by name; from Python as main(model_path, prompt, image_file_path, **flags).
    The flags (signature and Args below) come from FLAGS. Errors end in one stderr line and sys.exit(2, 1 or 130).
    """
    options = Options(**signature_of(FLAGS).bind(*args, **flags).arguments)
    stage = "checking the flags"
    failed = 0
    try:
        check_options(options, FLAGS)
        if options.only_cpu and options.device is not None and str(options.device) != "cpu":
            raise UsageError(f"--only_cpu True contradicts --device {options.device}; give one of them")
        paths, many = expand_image_paths(options.image_file_path)
        drawings = output_image_paths(options.output_image, paths, many)
        device, dtype = resolve_device_dtype("cpu" if options.only_cpu else options.device, options.dtype,
                                             check_method(options.quantize))
        compile = options.compile
        if compile and device.type != "cuda":
            log(f"note: --compile pays only on CUDA (CUDA graphs); running eager on {device.type}")
            compile = False
        if device.type == "cpu" and dtype == torch.float16:
            log("note: float16 on CPU works but is slow (no fast float16 CPU kernels); float32 or bfloat16 is faster")
        if not many:
            stage = "reading the image"
            image = load_image(paths[0])  # before the model: a bad image should not cost a long load
        stage = "loading the model"
        started = time.perf_counter()
        model, tokenizer = load_hf_model(str(options.model_path), device, dtype, pack=None,  # packs where it pays
                                         quantize=options.quantize)
        log(f"loaded {options.model_path} on {model.device} as {model.dtype}")
        stats = _Stats(time.perf_counter() - started, model.config.eos_token_id) if options.verbose else None
        stage = "generating"
        processor = make_processor(model, tokenizer)
        sampling = SamplingConfig(max_new_tokens=options.max_tokens_to_generate, do_sample=options.do_sample,
                                  temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                  seed=options.seed)
        run = _Run(prompt=str(options.prompt), sampling=sampling, compile=compile, stats=stats)
        if many:
            failed = _answer_many(model, processor, run, paths, options.batch_size, drawings)
        else:
            _answer_one(model, processor, run, paths[0], image, options.stream and not options.json, options.json,
                        drawings and drawings[0])
        if stats is not None:
            stats.report(many)
    except BaseException as e:  # noqa: BLE001 — every failure becomes one line; --debug shows the traceback
        # SystemExit passes; a closed stdout goes to cli()'s handler, which knows how to exit quietly.
        if options.debug is True or isinstance(e, (SystemExit, BrokenPipeError)):
            raise
        code, message = describe(e, stage)
        log(f"error: {message}")
        sys.exit(code)
    if failed:
        log(f"error: {failed} of {len(paths)} images could not be read; their JSON lines on stdout say why")
        sys.exit(EXIT_BAD_INPUT)


main.__signature__ = signature_of(FLAGS)  # what fire, inspect and help() see: one parameter per flag
main.__doc__ += args_doc(FLAGS)


def _answer_one(model, processor, run: _Run, path, image, stream, as_json, drawing) -> None:
    """One image: the plain answer (streamed, or all at the end) or one JSON object; the drawing if asked for."""
    shown: list[str] = []
    text = _generate(model, processor, run, [image], _show(shown) if stream else None)[0]
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


def _answer_many(model, processor, run: _Run, paths, batch_size, drawings) -> int:
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
                texts = _generate(model, processor, run, [images[i] for i in rows])
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


def _generate(model, processor, run: _Run, images, on_text=None) -> list[str]:
    """generate() for the run's prompt on each image, timed for --verbose when the run has stats."""
    stats = run.stats
    if stats is not None:
        stats.begin(len(images))
    texts = generate(model, processor, [run.prompt] * len(images), images, on_token=stats.on_token if stats else None,
                     on_text=on_text, compile=run.compile, sampling=run.sampling)
    if stats is not None:
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


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: argv parsed by FLAGS' rules (cli_checks.parse_argv), then handed to fire in its plainest
    form, `--name=VALUE` per flag (cli_checks.fire_command): fire parses the values and calls main. Flag names are
    checked here, before anything loads; --help is FLAGS' own text on stdout. Every failure is one "error:" line.

    fire keeps what it is good at (Python-literal values, the call); the rules a user sees (spelling, short forms,
    bool flags alone, several image paths, help) are ours, so a fire upgrade that changes its own argv rules or
    help format changes nothing here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        given = parse_argv(argv, FLAGS)
    except UsageError as e:
        log(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    try:
        if given is None:
            sys.stdout.write(help_text(FLAGS, "inference.py", ABOUT, EXAMPLES, EXIT_CODES))
        else:
            import fire

            fire.Fire(main, command=fire_command(given, FLAGS), name="inference.py")
        sys.stdout.flush()  # a block-buffered stdout would otherwise fail only at exit, outside this handler
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — keeps the interpreter's final flush quiet
        log("error: stdout was closed before the answer was written (e.g. piped into head)")
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    cli()
