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

import os
import signal
import sys

if __name__ == "__main__":
    # Set before the imports below (torch and transformers take about a second), so a Ctrl-C, SIGTERM or SIGHUP
    # that arrives while they run is one line and 128 + N too; cli() puts in its own handlers once it runs.
    def _stopped_while_starting(signum: int, frame: object) -> None:
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        os.write(2, f"error: {what} while starting\n".encode())  # as cli_checks.describe words it
        os._exit(128 + signum)

    for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, _name):
            signal.signal(getattr(signal, _name), _stopped_while_starting)

import dataclasses
import json as _json  # FLAGS has a --json flag
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from batch_run import Job, path_text, read_image_list
from cli_checks import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    Flag,
    OutputError,
    UsageError,
    args_doc,
    check_options,
    describe,
    fire_command,
    help_text,
    log,
    one_line,
    options_class,
    parse_argv,
    signature_of,
    stop_on_signals,
)
from generation import (  # noqa: F401 — re-exported: `from inference import ...` as before generation.py existed
    SAMPLING_RULES,
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
from image_files import (  # noqa: F401 — load_image, ImageError: part of this module's API since the seed
    ImageError,
    expand_image_paths,
    load_image,
    output_image_paths,
    save_image,
)
from ops import PACK_MIN_ANSWERS
from processing_paligemma import Detection, check_prompt, draw_detections, parse_detections, to_rgb
from quantize import check_method
from ranks import Rank
from run_stats import RunStats
from segmentation import HUB_VAE, Segment, draw_segments, load_vae, read_segments, resolve_vae_path
from utils import load_hf_model, loads_as_int8, resolve_device_dtype


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
         valid=SAMPLING_RULES["max_new_tokens"]),
    Flag("temperature", float, 0.8, "sampling temperature (used with --do_sample True; 0 means greedy).",
         valid=SAMPLING_RULES["temperature"]),
    Flag("top_p", float, 0.9, "nucleus sampling threshold in (0, 1].", valid=SAMPLING_RULES["top_p"]),
    Flag("do_sample", bool, False, "sample instead of greedy decoding."),
    Flag("only_cpu", bool, False, "force the CPU even if CUDA/MPS is available."),
    Flag("device", str, None, "cpu, cuda, cuda:N or mps.", metavar="DEVICE",
         shown_default="CUDA, else MPS, else CPU"),
    Flag("dtype", str, None, "float32, bfloat16 or float16.", metavar="DTYPE",
         shown_default="float32 on CPU, bfloat16 on CUDA/MPS and for int8 weights"),
    Flag("top_k", int, 0, "keep only the k most likely tokens when sampling (0 = off).",
         valid=SAMPLING_RULES["top_k"]),
    Flag("seed", int, None, "random seed for sampling, for reproducible output.", shown_default="a random seed",
         valid=SAMPLING_RULES["seed"]),
    Flag("debug", bool, False, "show Python tracebacks instead of one-line errors."),
    Flag("stream", bool, True, "one image, plain text: print the answer token by token as it is generated."),
    Flag("json", bool, False, 'one image: print {"path", "text", "boxes", "problems"} as JSON instead of the plain '
         'answer (and "segments", masks as COCO RLE, for a segmentation answer with a VAE).', short="j"),
    Flag("output_image", str, None, "draw the detected boxes and labels (and masks, with a VAE): a file (.png, "
         ".jpg) for one image, an existing directory for several (each drawn as <name>.png).", metavar="PATH",
         shown_default="no drawing"),
    Flag("vae_path", str, None, "the mask VAE that turns segment answers into masks: big_vision's vae-oid.npz, or "
         f"a hub location such as {HUB_VAE}.", metavar="PATH",
         shown_default="vae-oid.npz in the checkpoint directory if there is one, else no masks"),
    Flag("batch_size", int, 8, "images per forward pass when there are several.", short="b",
         valid=("a positive integer", _at_least(1))),
    Flag("verbose", bool, False, "print load time, time to first token and tokens/s (images/s for several) to "
         "stderr.", short="v"),
    Flag("quantize", str, None, "int8: int8 weights with per-output-channel scales, quantized while loading a "
         "float checkpoint (half the bytes of bfloat16; faster CPU decode; logits move, see README). A checkpoint "
         "saved by quantize.py is int8 without this flag.", metavar="METHOD", shown_default="none"),
    Flag("compile", bool, False, "CUDA only: compile the prefill and each decoded token into CUDA graphs "
         "(torch.compile); the first call compiles for a while, so it pays for long answers and many images. "
         "Ignored elsewhere.", short="c"),
    Flag("output", str, None, "write the JSON lines to this file instead of stdout (stdout gets a summary); "
         "resumable: a rerun skips the images already answered. Needed under torchrun, where each rank answers "
         "its share and rank 0 merges them (docs/distributed.md).", metavar="FILE.jsonl", shown_default="stdout"),
    Flag("image_list", str, None, "a text file with one image path per line (relative to the file's directory), "
         "instead of --image_file_path; the output keeps its order.", metavar="FILE", shown_default="none"),
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
    stats: RunStats | None
    vae: Any = None  # segmentation.MaskVAE, on the model's device, or None


def main(*args: Any, **flags: Any) -> None:
    """Answer a prompt about one image or many with a PaliGemma checkpoint; stdout carries only the answers.

    Called by fire with every flag by name; from Python as main(model_path, prompt, image_file_path, **flags).
    The flags (signature and Args below) come from FLAGS. Errors end in one stderr line and sys.exit(2, 1 or 130).
    """
    options = Options(**signature_of(FLAGS).bind(*args, **flags).arguments)
    stage = "checking the flags"
    failed, job = 0, None
    try:
        if options.image_list is not None:  # the list stands in for --image_file_path, required otherwise
            options = dataclasses.replace(options, image_file_path=read_image_list(options.image_list,
                                                                                   options.image_file_path))
        check_options(options, FLAGS)
        if options.only_cpu and options.device is not None and str(options.device) != "cpu":
            raise UsageError(f"--only_cpu True contradicts --device {options.device}; give one of them")
        check_prompt(options.prompt, "--prompt")
        if options.image_list is None:
            paths, many = expand_image_paths(options.image_file_path)
        else:  # as listed: no stat of each of a million files here
            paths, many = list(options.image_file_path), True
        many = many or options.output is not None  # --output is JSON Lines, whatever the count
        drawings = output_image_paths(options.output_image, paths, many)
        rank = Rank.from_env()  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK...; rank 0 of 1 without it
        # A checkpoint saved by quantize.py is int8 without --quantize: bfloat16 float parts by default, as
        # load_hf_model decides (a hub id's files are there only after the download: the loader decides).
        int8 = os.path.isdir(str(options.model_path)) and loads_as_int8(options.model_path, options.quantize)
        device, dtype = resolve_device_dtype(rank.device("cpu" if options.only_cpu else options.device), options.dtype,
                                             "int8" if int8 else check_method(options.quantize))
        rank.bind(device)  # under torchrun: its share of the CPU cores, or its GPU as the current device
        if rank.launched and options.output is None:
            raise UsageError("under torchrun give --output FILE.jsonl: each rank answers its share into it")
        compile = options.compile
        if compile and device.type != "cuda":
            log(f"note: --compile pays only on CUDA (CUDA graphs); running eager on {device.type}")
            compile = False
        if device.type == "cpu" and dtype == torch.float16:
            log("note: float16 on CPU works but is slow (no fast float16 CPU kernels); float32 or bfloat16 is faster")
        if not many:
            stage = "reading the image"
            image = load_image(paths[0])  # before the model: a bad image should not cost a long load
        stage = "loading the mask VAE"
        vae_path = resolve_vae_path(options.vae_path, options.model_path)
        vae = load_vae(vae_path) if vae_path else None
        job = None
        if options.output is not None:
            stage = "reading what is answered already"
            # What decides the answers: a resumed run refuses to mix in answers made with other values.
            settings = {f: getattr(options, f) for f in ("prompt", "max_tokens_to_generate", "do_sample",
                                                         "temperature", "top_p", "top_k", "seed", "quantize")}
            # vae_path as given (an hf:// location, not its cache path, which a new snapshot would change); the
            # checkpoint's own vae-oid.npz when none is given.
            model_path = str(options.model_path)  # a local directory resolved: "ckpt" means another one elsewhere
            settings.update(model_path=os.path.realpath(model_path) if os.path.isdir(model_path) else model_path,
                            dtype=str(dtype),
                            vae_path=str(options.vae_path) if options.vae_path else vae_path)
            job = Job(options.output, paths, settings, rank, options.image_list)
            if not job.plan():  # nothing left for this rank: no model to load
                return _exit_if_failed(job.finish(), len(paths), options.output)
        stage = "loading the model"
        started = time.perf_counter()
        # Packing bf16 weights pays only over many answers (ops.PACK_MIN_ANSWERS), and then where the CPU can.
        pack = None if len(paths) >= PACK_MIN_ANSWERS else False
        # options.dtype, not dtype: the loader resolves it the same way, and also for a hub id's int8 checkpoint.
        model, tokenizer = load_hf_model(str(options.model_path), device, options.dtype, pack=pack,
                                         quantize=options.quantize)
        stage = "generating"  # before the "loaded" line: what follows it is generation
        log(f"loaded {options.model_path} on {model.device} as {model.dtype}")
        stats = RunStats(time.perf_counter() - started, model.config.eos_token_id) if options.verbose else None
        processor = make_processor(model, tokenizer)
        sampling = SamplingConfig(max_new_tokens=options.max_tokens_to_generate, do_sample=options.do_sample,
                                  temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                  seed=options.seed)
        run = _Run(prompt=str(options.prompt), sampling=sampling, compile=compile, stats=stats,
                   vae=vae and vae.to(model.device))
        if job is not None:
            job.answer(lambda indices: [_json_line(r) for r in _answer_batch(model, processor, run, paths, indices,
                                                                               drawings)], options.batch_size)
            failed = job.finish()
        elif many:
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
    finally:
        if job is not None:
            job.release()  # a failed run lets the next run of its output start (from Python too)
    _exit_if_failed(failed, len(paths), options.output)


def _exit_if_failed(failed: int, total: int, output: str | None) -> None:
    if failed:
        log(f"error: {failed} of {total} images could not be read; their JSON lines "
            f"{'on stdout' if output is None else 'in ' + str(output)} say why")
        sys.exit(EXIT_BAD_INPUT)


main.__signature__ = signature_of(FLAGS)  # what fire, inspect and help() see: one parameter per flag
main.__doc__ += args_doc(FLAGS)


def _answer_one(model, processor, run: _Run, path, image, stream, as_json, drawing) -> None:
    """One image: the plain answer (streamed, or all at the end) or one JSON object; the drawing if asked for."""
    shown: list[str] = []
    text = _generate(model, processor, run, [image], _show(shown) if stream else None)[0]
    segments, seg_problems = read_segments(text, image.size, run.vae, log)  # (None, []): not segmentation, or no VAE
    if as_json or drawing:
        boxes, problems = parse_detections(text, *image.size)
        problems = problems if segments is None else seg_problems
    if drawing:
        save_image(draw_detections(image, boxes) if segments is None else draw_segments(image, segments), drawing)
        log(f"note: drew {len(boxes)} box{'es' * (len(boxes) != 1)} on {drawing}")
        for problem in problems:
            log(f"note: {problem}")
    if as_json:
        _emit(_json.dumps(_record(path, text, boxes, problems, segments), ensure_ascii=False) + "\n")
    else:
        done = "".join(shown)
        _emit((text[len(done):] if text.startswith(done) else "") + "\n")  # the rest (all when not streamed)


def _answer_many(model, processor, run: _Run, paths, batch_size, drawings) -> int:
    """Several images, batch_size at a time: one JSON line per image in input order. Returns how many failed."""
    failed = 0
    with tqdm(total=len(paths), desc="images", unit="image", file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            indices = range(start, min(start + batch_size, len(paths)))
            for record in _answer_batch(model, processor, run, paths, indices, drawings):
                _emit(_json_line(record) + "\n")
                failed += "error" in record
                bar.update(1)
    return failed


def _answer_batch(model, processor, run: _Run, paths, indices, drawings) -> list[dict]:
    """The records of paths[i] for i in indices (one forward pass), in that order; also --output_image's drawings.
    An image that cannot be read or converted gets its error record; the others go on."""
    chunk = [(i, paths[i]) for i in indices]
    images: dict[int, Image.Image] = {}
    records: dict[int, dict] = {}
    for i, path in chunk:
        try:
            images[i] = to_rgb(load_image(path))
        except (ValueError, OSError) as e:  # load_image: any undecodable file; to_rgb: a mode Pillow cannot convert
            records[i] = {"path": path_text(path), "error": path_text(one_line(e))}  # the message names the path
    if images:
        rows = list(images)
        texts = _generate(model, processor, run, [images[i] for i in rows])
        for i, text in zip(rows, texts, strict=True):
            boxes, problems = parse_detections(text, *images[i].size)
            segments, seg_problems = read_segments(text, images[i].size, run.vae, log)
            records[i] = _record(paths[i], text, boxes, problems if segments is None else seg_problems, segments)
            if drawings:
                drawn = draw_detections(images[i], boxes) if segments is None else draw_segments(images[i], segments)
                save_image(drawn, drawings[i])
    return [records[i] for i, _ in chunk]


def _json_line(record: dict) -> str:
    """A record as its line of JSON Lines (stdout and --output alike), without the newline."""
    return _json.dumps(record, ensure_ascii=False)


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


def _record(path: str, text: str, boxes: list[Detection], problems: list[str],
            segments: list[Segment] | None = None) -> dict:
    record = {"path": path_text(path), "text": text, "boxes": [b.to_json() for b in boxes], "problems": problems}
    if segments is not None:  # a segmentation answer decoded with --vae_path: masks as COCO RLE
        record["segments"] = [s.to_json() for s in segments]
    return record


def _show(shown: list[str]) -> Callable[[str], None]:
    """on_text for streaming to stdout: each piece written and flushed at once, and remembered in `shown`."""
    def show(piece: str) -> None:
        _emit(piece)
        shown.append(piece)
    return show


def _emit(text: str) -> None:
    """Write to stdout and flush at once (answers stream, and a failure is met here, not at exit). A closed pipe
    goes to cli()'s handler; any other write error (a full disk, an I/O error) is an OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _drop_stdout()
        raise OutputError(f"cannot write the answer to stdout ({e.strerror or one_line(e)}); check where stdout "
                          "goes (a full disk?)") from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail again with a traceback."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — lives until exit


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: argv parsed by FLAGS' rules (cli_checks.parse_argv), then handed to fire in its plainest
    form, `--name=VALUE` per flag (cli_checks.fire_command): fire parses the values and calls main. Flag names are
    checked here, before anything loads; --help is FLAGS' own text on stdout. Every failure is one "error:" line.

    fire keeps what it is good at (Python-literal values, the call); the rules a user sees (spelling, short forms,
    bool flags alone, several image paths, help) are ours, so a fire upgrade that changes its own argv rules or
    help format changes nothing here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:  # started with stdout closed (>&-): the answers would have nowhere to go
        log("error: stdout is closed; run with stdout open, e.g. redirected to a file (> answers.txt)")
        sys.exit(EXIT_BAD_INPUT)
    with stop_on_signals(), warnings.catch_warnings():
        try:
            given = parse_argv(argv, FLAGS)
            if given is None or given.get("debug") != "True":
                _quiet_libraries()
            if given is None:
                _emit(help_text(FLAGS, "inference.py", ABOUT, EXAMPLES, EXIT_CODES))
            else:
                import fire

                fire.Fire(main, command=fire_command(given, FLAGS), name="inference.py")
        except (UsageError, OutputError, KeyboardInterrupt) as e:  # main() reports its own; these come before it
            code, message = describe(e, "starting")
            log(f"error: {message}")
            sys.exit(code)
        except BrokenPipeError:  # stdout closed early (e.g. piped into head): not worth a traceback
            _drop_stdout()
            log("error: stdout was closed before the answer was written (e.g. piped into head)")
            sys.exit(EXIT_FAILURE)


def _quiet_libraries() -> None:
    """The command line's stderr holds our lines only: warnings from torch, numpy, Pillow or transformers (for a
    developer, not for the user of a CLI; --debug keeps them) are silenced inside cli()'s catch_warnings block."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported (at load)
    if "transformers" in sys.modules:  # imported already: in-process callers such as the tests
        sys.modules["transformers"].logging.set_verbosity_error()


if __name__ == "__main__":
    cli()
