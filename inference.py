"""Generation (greedy / temperature / top-k / top-p), streaming text, and the command-line tool.

    python inference.py --model_path DIR --prompt "caption en" --image_file_path img.jpg
    python inference.py --model_path google/paligemma-3b-mix-224 --prompt "detect cat ; dog" \
        --image_file_path photos/ --output_image drawn/           # one JSON line per image, boxes drawn

stdout carries only the answers (one image: the text, streamed; several: JSON Lines); progress bars and
diagnostics go to stderr. Flag checks and error messages live in cli_checks.py. The generation loop follows
gpt-fast: a preallocated KV cache addressed by tensor positions, `prefill()` (vision tower + whole prompt, logits
for the last position only) separate from `decode_one_token()`, each row stopping on its own at EOS.
Checked against transformers' `GenerationMixin` greedy/sampling semantics (parity tests in tests/).
"""

from __future__ import annotations

import functools
import json as _json  # main() has a --json flag
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

import ops
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
from modeling_gemma import KVCache, PaliGemmaForConditionalGeneration
from processing_paligemma import Detection, PaliGemmaProcessor, draw_detections, parse_detections, to_rgb
from utils import load_hf_model, resolve_device, resolve_dtype


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


def auto_prefill_dtype(model: PaliGemmaForConditionalGeneration) -> torch.dtype:
    """The arithmetic dtype for the prefill: the weights' dtype, except bf16/fp16 weights on a CPU without
    native bf16 arithmetic, which prefill in float32 (the prefill is compute-bound; decode is memory-bound and
    stays in the weights' dtype, so it keeps reading half the bytes)."""
    if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        if model.dtype == torch.float16 or not ops.cpu_has_bf16_arithmetic():
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


@functools.cache
def _compiled_decode_step(device_type: str) -> Callable[..., torch.Tensor]:
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_one_token, mode=mode, fullgraph=True)


def compiled_decode_step(model: PaliGemmaForConditionalGeneration) -> Callable[..., torch.Tensor]:
    """decode_one_token compiled for the model's device type: mode "reduce-overhead" on CUDA, i.e. one CUDA graph
    replayed per token; the default inductor mode elsewhere. The first calls of each new shape compile. One
    compiled function per device type (torch.compile keeps its graphs per code object and guards, so a second
    model gets graphs of its own either way)."""
    return _compiled_decode_step(model.device.type)


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

    # The compiled step needs a cache with a fixed address, which the model keeps for reuse.
    cache = model.new_kv_cache(B, T + max_new_tokens, reuse=compile)
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


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback tokens


class TextStream:
    """Generated ids of one answer -> text pieces as the ids arrive; the pieces join to exactly decode_text(ids).

    Decoding is not piecewise inside a run of byte-fallback tokens: `<0xE2><0x82><0xAC>` is "€", and tokenizers'
    ByteFallback decodes a whole run at once, turning every byte into U+FFFD when the run as a whole is not UTF-8
    (so a later byte can spoil an already complete character). So nothing of a byte run is emitted until a
    non-byte token ends it; a multi-byte character split over tokens appears whole. Each step decodes only the
    ids since the last emitted piece, with that piece's ids as context (for decoders that treat the first token
    differently), so an n-token answer costs O(n) decoding, not O(n²).
    """

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        # Dropped by decode(skip_special_tokens=True) (every added token marked special, e.g. <end_of_turn>, not
        # only the named ones), so they must not end a byte run here either.
        self.skipped = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
        self.ids: list[int] = []
        self.context = 0  # ids[context:emitted] made the last piece: the context for decoding the next one
        self.emitted = 0  # the text of ids[:emitted] is out
        self.pieces: list[str] = []
        self.done = False

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text that became final with it (often "")."""
        if self.done or token_id in self.eos:
            self.done = True
            return ""
        if token_id in self.skipped:
            return ""
        self.ids.append(int(token_id))
        if _BYTE_PIECE.fullmatch(self.tokenizer.convert_ids_to_tokens(int(token_id)) or ""):
            return ""  # inside a byte run: its text is known only when the run ends
        before = self._decode(self.ids[self.context:self.emitted])
        now = self._decode(self.ids[self.context:])
        if not now.startswith(before):  # a decoder that rewrites earlier text: finish() settles it
            return ""
        self.context, self.emitted = self.emitted, len(self.ids)
        return self._out(now[len(before):])

    def finish(self) -> str:
        """The text not yet returned (e.g. a trailing byte run); after it the pieces join to decode_text(ids)."""
        self.done = True
        full, out = self._decode(self.ids), "".join(self.pieces)
        return self._out(full[len(out):] if full.startswith(out) else "")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _out(self, piece: str) -> str:
        if piece:
            self.pieces.append(piece)
        return piece


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
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    compile: bool = False,
) -> list[str]:
    """Answer each (prompt, image) pair; returns one string per pair, the prompt not included.

    on_token is called with each step's token ids (B,); on_text (one pair only) with each new piece of text as
    it is generated — the pieces join to the returned string. compile: see generate_ids (pays on CUDA only).

    >>> model, tokenizer = load_hf_model("paligemma-3b-pt-224", "cpu")
    >>> processor = make_processor(model, tokenizer)
    >>> generate(model, processor, ["caption en"], [Image.open("cow.jpg")], max_new_tokens=20)
    >>> generate(model, processor, "caption en", Image.open("cow.jpg"), on_text=lambda s: print(s, end=""))
    """
    inputs = processor(text=prompts, images=images)
    eos = model.config.eos_token_id
    step = on_token
    if on_text is not None:
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("on_text streams one answer; give one prompt and one image")
        stream = TextStream(processor.tokenizer, eos)

        def step(token: torch.Tensor) -> None:
            if on_token is not None:
                on_token(token)
            piece = stream.push(int(token[0]))
            if piece:
                on_text(piece)

    ids = generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                       max_new_tokens, do_sample, temperature, top_p, top_k, seed, on_token=step, compile=compile)
    if on_text is not None and (rest := stream.finish()):
        on_text(rest)
    return [decode_text(processor.tokenizer, row, eos) for row in ids.cpu()]


def make_processor(model: PaliGemmaForConditionalGeneration, tokenizer) -> PaliGemmaProcessor:
    """The processor matching a loaded model's image size and image-token count."""
    vc = model.config.vision_config
    return PaliGemmaProcessor(tokenizer, vc.num_image_tokens, vc.image_size)


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
        dev = resolve_device("cpu" if only_cpu else device)
        dt = resolve_dtype(dtype, dev)
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
