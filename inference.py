"""Generation (greedy / temperature / top-k / top-p) and the command-line tool.

    python inference.py --model_path DIR --prompt "caption en" --image_file_path img.jpg

stdout carries only the generated text; progress and diagnostics go to stderr. The generation loop follows
gpt-fast: a preallocated KV cache addressed by tensor positions, `prefill()` (vision tower + whole prompt, logits
for the last position only) separate from `decode_one_token()`, each row stopping on its own at EOS.
Checked against transformers' `GenerationMixin` greedy/sampling semantics (parity tests in tests/).
"""

from __future__ import annotations

import difflib
import inspect
import os
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from modeling_gemma import KVCache, PaliGemmaForConditionalGeneration
from processing_paligemma import PaliGemmaProcessor, ProcessorError
from utils import CheckpointError, load_hf_model, resolve_device, resolve_dtype


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits (B, V) -> (B,).

    Greedy (argmax) unless do_sample and temperature > 0. Sampling: divide by temperature, keep the top_k best
    (0 = all), then the nucleus — the smallest set of best tokens whose probability sums to >= top_p — and draw
    from what is left, renormalised.
    """
    logits = logits.float()
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token stays if the tokens ranked above it sum to < top_p; the best token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm), read from Linux's
    /proc/cpuinfo; False elsewhere. Without it, oneDNN emulates bf16 matmuls several times slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def auto_prefill_dtype(model: PaliGemmaForConditionalGeneration) -> torch.dtype:
    """The arithmetic dtype for the prefill: the weights' dtype, except bf16/fp16 weights on a CPU without
    native bf16 arithmetic, which prefill in float32 (the prefill is compute-bound; decode is memory-bound and
    stays in the weights' dtype, so it keeps reading half the bytes)."""
    if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        if model.dtype == torch.float16 or not cpu_has_bf16_arithmetic():
            return torch.float32
    return model.dtype


def prefill(
    model: PaliGemmaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor,
    kv_cache: KVCache,
    position_ids: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the vision tower and the whole prompt once, filling the cache; logits (B, V) for the last position."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    out = model(input_ids, pixel_values, attention_mask, kv_cache=kv_cache, input_pos=input_pos,
                position_ids=position_ids, num_logits_to_keep=1, compute_dtype=compute_dtype)
    return out["logits"][:, -1]


def decode_one_token(
    model: PaliGemmaForConditionalGeneration,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    position_ids: torch.Tensor,
    kv_cache: KVCache,
) -> torch.Tensor:
    """One cached step: token (B, 1) at cache slot input_pos (1,) and RoPE positions (B, 1) -> logits (B, V).

    Shapes are static and positions are tensors, so the step can be compiled once (CUDA graphs) and replayed."""
    return model(token, kv_cache=kv_cache, input_pos=input_pos, position_ids=position_ids)["logits"][:, -1]


def compiled_decode_step(model: PaliGemmaForConditionalGeneration):
    """decode_one_token compiled for this model (cached on it): mode "reduce-overhead" on CUDA, i.e. one CUDA graph
    replayed per token; the default inductor mode elsewhere. The first calls of each new shape compile."""
    fn = getattr(model, "_compiled_decode", None)
    if fn is None:
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        fn = torch.compile(decode_one_token, mode=mode, fullgraph=True)
        model._compiled_decode = fn
    return fn


def _decode_cache(model: PaliGemmaForConditionalGeneration, batch_size: int, length: int) -> KVCache:
    """For the compiled step: one cache per (batch, length rounded up to 256) kept on the model and reused, with
    static addresses, so CUDA graphs recorded for it stay valid across calls and few lengths need their own graph.
    Zeroed in place before each use (stale values sit at masked positions, but a NaN there would still leak)."""
    size = -(-length // 256) * 256
    caches = model.__dict__.setdefault("_decode_caches", {})
    cache = caches.get((batch_size, size))
    if cache is None or cache.k_cache.dtype != model.dtype or cache.k_cache.device != model.device:
        cache = caches[(batch_size, size)] = model.new_kv_cache(batch_size, size)
        for buf in cache.buffers():
            torch._dynamo.mark_static_address(buf)  # updated in place by the graph, never reallocated
    for buf in cache.buffers():
        buf.zero_()
    return cache


# On an accelerator, reading `finished.all()` waits for the GPU; checking EOS every few steps keeps the host
# ahead of the device. Rows that finished meanwhile only get padding, so the output is the same.
_EOS_CHECK_EVERY = {"cpu": 1}


@torch.inference_mode()
def generate_ids(
    model: PaliGemmaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 100,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
    prefill_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate up to max_new_tokens per row -> (B, n) new token ids; after a row's EOS it holds padding.

    eos_token_ids: default from the config ([1], or [1, 107] for PaliGemma 2); an empty list ignores EOS
    (benchmarks force a fixed length that way). seed fixes the sampling generator. on_token, if given, is called
    with each step's tokens (B,) as soon as they are chosen (streaming); rows already finished hold pad_token_id.
    compile: run the decode step through torch.compile (worth it on CUDA: one CUDA graph per token; the first
    call compiles for tens of seconds). prefill_dtype: arithmetic dtype of the prefill, default
    auto_prefill_dtype(model).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    input_ids = input_ids.to(device)
    pixel_values = pixel_values.to(device)
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    cfg = model.config
    max_pos = cfg.text_config.max_position_embeddings
    if T + max_new_tokens > max_pos:
        raise ValueError(
            f"prompt ({T} tokens incl. {cfg.num_image_tokens} image tokens) + {max_new_tokens} new tokens exceeds "
            f"the model's {max_pos} positions; shorten the prompt or lower max_tokens_to_generate"
        )
    eos = torch.tensor(cfg.eos_token_id if eos_token_ids is None else list(eos_token_ids), device=device)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    generator = None
    if do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    cache = _decode_cache(model, B, T + max_new_tokens) if compile else model.new_kv_cache(B, T + max_new_tokens)
    # RoPE positions count real tokens only, so a left-padded row sees the same positions as it would alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_pos = attention_mask.long().sum(-1, keepdim=True)  # (B, 1)
    logits = prefill(model, input_ids, pixel_values, attention_mask, cache, position_ids,
                     prefill_dtype or auto_prefill_dtype(model))
    step_fn = compiled_decode_step(model) if compile else decode_one_token
    check_every = _EOS_CHECK_EVERY.get(device.type, 8)

    out = []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    input_pos = torch.tensor([T], device=device)  # cache slot of the next token, advanced on the device
    for step in range(max_new_tokens):
        token = sample_next_token(logits, do_sample, temperature, top_p, top_k, generator)
        token = token.masked_fill(finished, pad)
        out.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = step_fn(model, token[:, None], input_pos, next_pos, cache)
        # New tensors, not in-place updates: a CUDA-graph step may still hold the previous ones as inputs.
        input_pos = input_pos + 1
        next_pos = next_pos + 1
    return torch.stack(out, dim=1)


def decode_text(tokenizer, ids: torch.Tensor, eos_token_ids: Sequence[int]) -> str:
    """New ids of one row -> text, cut at the first EOS; special tokens (BOS/EOS/pad) dropped, <loc> kept."""
    row = ids.tolist()
    for i, t in enumerate(row):
        if t in eos_token_ids:
            row = row[:i]
            break
    return tokenizer.decode(row, skip_special_tokens=True)


def generate(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    prompts: Sequence[str] | str,
    images: Sequence[Image.Image] | Image.Image,
    max_new_tokens: int = 100,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[str]:
    """Answer each (prompt, image) pair; returns one string per pair, the prompt not included.

    >>> model, tokenizer = load_hf_model("paligemma-3b-pt-224", "cpu")
    >>> processor = make_processor(model, tokenizer)
    >>> generate(model, processor, ["caption en"], [Image.open("cow.jpg")], max_new_tokens=20)
    """
    inputs = processor(text=prompts, images=images)
    ids = generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                       max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    eos = model.config.eos_token_id
    return [decode_text(processor.tokenizer, row, eos) for row in ids.cpu()]


def make_processor(model: PaliGemmaForConditionalGeneration, tokenizer) -> PaliGemmaProcessor:
    """The processor matching a loaded model's image size and image-token count."""
    vc = model.config.vision_config
    return PaliGemmaProcessor(tokenizer, vc.num_image_tokens, vc.image_size)


class ImageError(ValueError):
    """An image file that cannot be used as-is; the message names the file and what to do."""


class UsageError(ValueError):
    """A command-line flag that is missing, unknown or has a bad value."""


def load_image(path: str) -> Image.Image:
    """Open an image file fully (so truncation is caught here), apply EXIF orientation as transformers does.

    Raises ImageError for a missing path, a directory, an empty/unreadable/truncated file, or one above Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS; refused already at 1x, where Pillow only warns). An
    animated image gives its first frame, with a note on stderr.
    """
    p = Path(path)
    if not str(path):
        raise ImageError("no image given; pass --image_file_path FILE")
    if not p.exists():
        raise ImageError(f"image file {p} does not exist; check --image_file_path")
    if p.is_dir():
        raise ImageError(f"image path {p} is a directory; give an image file inside it")
    if p.stat().st_size == 0:
        raise ImageError(f"image file {p} is empty (0 bytes); re-download or re-save it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                out = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image file {p} is too large to decode safely ({str(e).split(',')[0]}); downscale it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PaliGemma sees at most 896x896 anyway)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{p} is not an image file Pillow can read; give a JPEG, PNG, GIF, WebP, BMP or TIFF file"
        ) from None
    except PermissionError:
        raise ImageError(f"image file {p} cannot be read (permission denied); check its permissions") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageError(
            f"image file {p} is truncated or corrupt ({_one_line(e)}); re-download or re-save it"
        ) from None
    if frames > 1:
        _log(f"note: {p.name} has {frames} frames; using the first")
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Exit codes: 2 bad input (flags, image, checkpoint), 1 out of memory or an unexpected error, 130 interrupted.
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def main(
    model_path: str | None = None,
    prompt: str = "",
    image_file_path: str | None = None,
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
) -> None:
    """Answer a prompt about an image with a PaliGemma checkpoint; prints only the generated text.

    Args:
        model_path: checkpoint directory in the Hugging Face layout (config.json, *.safetensors, tokenizer).
        prompt: task prompt, e.g. "caption en", "answer en what is this?", "detect cat" ("" is valid).
        image_file_path: the image to ask about.
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

    Errors end in one stderr line starting with "error:" and exit code 2 (bad input), 1 (out of memory or a
    bug; --debug shows the traceback) or 130 (interrupted); see README "Errors".
    """
    stage = "checking the flags"
    try:
        _check_flags(max_tokens_to_generate, temperature, top_p, top_k, do_sample, only_cpu)
        _check_run_flags(model_path, image_file_path, device, only_cpu, seed, debug)
        dev = resolve_device("cpu" if only_cpu else device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu" and dt == torch.float16:
            _log("note: float16 on CPU works but is slow (no fast float16 CPU kernels); float32 or bfloat16 is faster")
        stage = "reading the image"
        image = load_image(str(image_file_path))  # before the model: a bad image should not cost a long load
        stage = "loading the model"
        model, tokenizer = load_hf_model(str(model_path), dev, dt)
        _log(f"loaded {model_path} on {model.device} as {model.dtype}")
        stage = "generating"
        processor = make_processor(model, tokenizer)
        text = generate(model, processor, [str(prompt)], [image], max_tokens_to_generate, do_sample,
                        temperature, top_p, top_k, seed)[0]
    except BaseException as e:  # noqa: BLE001 — every failure becomes one line; --debug shows the traceback
        if debug is True or isinstance(e, SystemExit):
            raise
        code, message = _describe(e, stage)
        _log(f"error: {message}")
        sys.exit(code)
    print(text)


def _describe(e: BaseException, stage: str) -> tuple[int, str]:
    """An exception -> (exit code, the one-line message after "error: ")."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted while {stage}"
    oom = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
    if oom:
        detail = f" ({_one_line(e)[:200]})" if str(e) else ""
        if stage == "generating":
            hint = "lower --max_tokens_to_generate, use --dtype bfloat16, or use a device with more memory"
        else:
            hint = "try --dtype bfloat16 (half of float32), a smaller checkpoint, or a device with more memory"
        return EXIT_FAILURE, f"out of memory while {stage}{detail}; {hint}"
    if isinstance(e, (CheckpointError, ProcessorError, ImageError, UsageError, ValueError)):
        return EXIT_BAD_INPUT, _one_line(e)
    if isinstance(e, OSError) and e.filename is not None:
        return EXIT_BAD_INPUT, f"{e.strerror or _one_line(e)}: {e.filename}; check the path and its permissions"
    return EXIT_FAILURE, (f"unexpected {type(e).__name__} while {stage}: {_one_line(e)[:300]}; "
                          "rerun with --debug for the traceback and report it")


def _check_flags(max_tokens, temperature, top_p, top_k, do_sample, only_cpu) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"--max_tokens_to_generate must be a positive integer, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise UsageError(f"--temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"--top_k must be an integer >= 0, got {top_k!r}")
    for name, value in (("--do_sample", do_sample), ("--only_cpu", only_cpu)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")


def _check_run_flags(model_path, image_file_path, device, only_cpu, seed, debug) -> None:
    if not isinstance(debug, bool):
        raise UsageError(f"--debug must be True or False, got {debug!r}")
    if model_path is None or model_path == "":
        raise UsageError("--model_path is required: the checkpoint directory (config.json, *.safetensors, tokenizer)")
    if image_file_path is None or image_file_path == "":
        raise UsageError("--image_file_path is required: the image to ask about")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    if only_cpu and device is not None and str(device) != "cpu":
        raise UsageError(f"--only_cpu True contradicts --device {device}; give one of them")


# Flags whose value is text: passed to fire as a quoted literal so that e.g. --prompt 1e3 stays "1e3"
# (fire would otherwise turn it into the float 1000.0) and --model_path 2024 stays a path.
_TEXT_FLAGS = ("model_path", "prompt", "image_file_path", "device", "dtype")


def _prepare_argv(argv: list[str]) -> list[str]:
    """Check flag names before fire runs main (fire runs it first and complains about unknown flags after) and
    quote the values of text flags. Raises UsageError for an unknown flag or a surplus positional argument."""
    params = inspect.signature(main).parameters
    bools = {n for n, p in params.items() if isinstance(p.default, bool)}
    out, given, positional = [], set(), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # fire's own flags follow
            out += argv[i:]
            break
        if not tok.startswith("--") or tok == "--help":
            if tok.startswith("-") and tok not in ("-h", "-", "--help") and not _is_number(tok):
                raise UsageError(f"unknown option {tok}; flags are spelled --name (see --help)")
            if not tok.startswith("-") or _is_number(tok):
                positional.append(tok)
            out.append(tok)
            i += 1
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if name not in params and name.startswith("no") and name[2:] in bools and not eq:
            given.add(name[2:])
            out.append(tok)
            i += 1
            continue
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise UsageError(f"unknown flag --{name}; {hint}see --help for the flags")
        given.add(name)
        if not eq:
            takes_value = name not in bools or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
            if not takes_value:
                out.append(tok)
                i += 1
                continue
            if i + 1 >= len(argv):
                raise UsageError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        out.append(f"--{name}={value!r}" if name in _TEXT_FLAGS else f"--{name}={value}")
        i += 1
    free = [n for n in params if n not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected argument {positional[len(free)]!r}; give options as --name value (see --help)")
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def cli(argv: list[str] | None = None) -> None:
    """The command line: flag names checked here, values parsed by fire, every failure one "error:" line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _prepare_argv(argv)
    except UsageError as e:
        _log(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    import fire

    try:
        fire.Fire(main, command=argv, name="inference.py")
        sys.stdout.flush()  # a block-buffered stdout would otherwise fail only at exit, outside this handler
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — keeps the interpreter's final flush quiet
        _log("error: stdout was closed before the answer was written (e.g. piped into head)")
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    cli()
