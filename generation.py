"""Generation: greedy / temperature / top-k / top-p decoding, streaming text, and the processor factory.

    model, tokenizer = load_hf_model("google/paligemma-3b-mix-224")
    generate(model, make_processor(model, tokenizer), "caption en", Image.open("cow.jpg"), max_new_tokens=20)

The loop follows gpt-fast: a preallocated KV cache addressed by tensor positions (`model.new_kv_cache`),
`prefill()` (vision tower + whole prompt, logits for the last position only) separate from `decode_one_token()`
(static shapes, so it compiles to one CUDA graph), each row of a batch stopping on its own at EOS. Sampling
settings travel as one `SamplingConfig`; `generate_ids` / `generate` also take them as separate keywords.

Checked against transformers' `GenerationMixin` greedy/sampling semantics (parity tests in tests/).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

import ops
from modeling_gemma import KVCache, PaliGemmaForConditionalGeneration
from processing_paligemma import PaliGemmaProcessor


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # bool is not a number here; inf and NaN are refused


# What each sampling setting must be: (the words for the error, the test). The one statement of these rules:
# SamplingConfig checks them, and the command line's flags (inference.FLAGS) use the same entries.
SAMPLING_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "max_new_tokens": ("a positive integer", lambda v: type(v) is int and v >= 1),
    "do_sample": ("True or False", lambda v: type(v) is bool),
    "temperature": ("a finite number >= 0", lambda v: _number(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "top_k": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    # torch.Generator.manual_seed takes any 64-bit unsigned value, and no more.
    "seed": ("an integer in [0, 2**64), or None", lambda v: v is None or (type(v) is int and 0 <= v < 2**64)),
}


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, and how many.

    Greedy (argmax) unless do_sample and temperature > 0. Sampling: divide the logits by temperature, keep the
    top_k best (0 = all), then the nucleus (the smallest set of best tokens whose probability sums to >= top_p),
    and draw from what is left, renormalised, with a generator seeded by `seed` (None: a random seed).
    Raises ValueError naming the setting when a value breaks SAMPLING_RULES.
    """

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, (must, ok) in SAMPLING_RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {must}, got {value!r}")


class NonFiniteError(ValueError):
    """The model's logits hold NaN or Inf: damaged weights or config values, or float16 overflow."""


def _non_finite(where: str) -> NonFiniteError:
    return NonFiniteError(
        f"the model's output holds NaN or Inf ({where}); the checkpoint's weights or config.json values are "
        "broken, or float16 overflowed — try --dtype bfloat16 or float32, or re-download the checkpoint")


def check_finite_logits(logits: torch.Tensor, where: str) -> None:
    """Raise NonFiniteError unless every logit is finite (reads the tensor: a device sync)."""
    if not bool(torch.isfinite(logits).all()):
        raise _non_finite(where)


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits (B, V) -> (B,), by the rules of SamplingConfig."""
    logits = logits.float()
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    # Shifted so the best logit is 0 before dividing: every value is then <= 0, and a tiny temperature sends the
    # others to -inf instead of overflowing to inf - inf = NaN in the softmax (the same distribution otherwise).
    # A temperature below float32's smallest normal value (~1.2e-38; below ~1e-45 it would round to 0, and 0 / 0
    # make the best logit NaN) is taken as that value: it leaves only the best token(s), as greedy.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token stays if the tokens ranked above it sum to < top_p; the best token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False  # explicitly: a top_p below float32's smallest value compares as 0 >= 0
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


@functools.cache
def _compiled_prefill() -> Callable[..., torch.Tensor]:
    # Graph breaks allowed: the embedding's <image>-count check reads a value. CUDA graphs per prompt shape.
    return torch.compile(prefill, mode="reduce-overhead")


def prefill_fn(model: PaliGemmaForConditionalGeneration, compile: bool) -> Callable[..., torch.Tensor]:
    """The prefill to run: compiled ("reduce-overhead", CUDA graphs) when compile=True on CUDA, where the eager
    prefill is launch-bound (its ~1000 small kernels take longer to launch than to run); eager elsewhere, where
    it is compute-bound and compiling would only cost time. Each new prompt shape records its own graphs."""
    return _compiled_prefill() if compile and model.device.type == "cuda" else prefill


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
    *,
    sampling: SamplingConfig | None = None,
) -> torch.Tensor:
    """Generate up to max_new_tokens per row -> (B, n) new token ids; after a row's EOS it holds padding.

    max_new_tokens .. seed: the SamplingConfig fields, or all of them at once as `sampling=` (then leave those
    six at their defaults). eos_token_ids: default from the config ([1], or [1, 107] for PaliGemma 2); an empty
    list ignores EOS (benchmarks force a fixed length that way). on_token, if given, is called with each step's
    tokens (B,) as soon as they are chosen (streaming); rows already finished hold pad_token_id. compile: run the
    decode step through torch.compile (worth it on CUDA: one CUDA graph per token; the first call compiles for a
    while), and on CUDA the prefill too (see prefill_fn). prefill_dtype: arithmetic dtype of the prefill, default
    auto_prefill_dtype(model).
    """
    loose = SamplingConfig(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    if sampling is None:
        sampling = loose
    elif loose != SamplingConfig():
        raise ValueError("give the sampling settings either as sampling=SamplingConfig(...) or one by one, not both")
    n_new = sampling.max_new_tokens  # SamplingConfig has checked every setting
    device = model.device
    input_ids = input_ids.to(device)
    pixel_values = pixel_values.to(device)
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):
        # The first new token is read at the last position: a right-padded row would continue from a pad.
        raise ValueError("attention_mask ends in 0 on some row: generation needs LEFT padding (every row's last "
                         "token real); PaliGemmaProcessor pads on the left")
    cfg = model.config
    max_pos = cfg.text_config.max_position_embeddings
    if T + n_new > max_pos:
        raise ValueError(
            f"prompt ({T} tokens incl. {cfg.num_image_tokens} image tokens) + {n_new} new tokens exceeds "
            f"the model's {max_pos} positions; shorten the prompt or lower max_tokens_to_generate"
        )
    eos = torch.tensor(cfg.eos_token_id if eos_token_ids is None else list(eos_token_ids), device=device)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    generator = None
    if sampling.do_sample:
        generator = torch.Generator(device=device)
        # No seed: a fresh non-deterministic one for this generator alone (torch.seed() would reseed the caller's
        # global RNG as a side effect).
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)

    # The compiled step needs a cache with a fixed address, which the model keeps for reuse.
    cache = model.new_kv_cache(B, T + n_new, reuse=compile)
    # RoPE positions count real tokens only, so a left-padded row sees the same positions as it would alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_pos = attention_mask.long().sum(-1, keepdim=True)  # (B, 1)
    logits = prefill_fn(model, compile)(model, input_ids, pixel_values, attention_mask, cache, position_ids,
                                        prefill_dtype or auto_prefill_dtype(model))
    # One read of the prompt's logits catches what broken weights or config values do to every answer (an
    # empty "" or garbage, otherwise); a NaN that first appears while decoding is caught below.
    check_finite_logits(logits, "after the prompt")
    step_fn = compiled_decode_step(model) if compile else decode_one_token
    check_every = _EOS_CHECK_EVERY.get(device.type, 8)
    # Sampling must see finite logits (a NaN probability is an error inside multinomial); greedy decoding only
    # needs to be told before it returns, so on a GPU the check waits for the EOS check's device sync.
    check_each_step = sampling.do_sample or check_every == 1

    out = []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    input_pos = torch.tensor([T], device=device)  # cache slot of the next token, advanced on the device
    for step in range(n_new):
        if step and check_each_step:
            check_finite_logits(logits, f"at new token {step + 1}")
        elif step:
            non_finite |= ~torch.isfinite(logits).all()
        token = sample_next_token(logits, sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k,
                                  generator)
        token = token.masked_fill(finished, pad)
        out.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, eos)
        if step == n_new - 1 or ((step + 1) % check_every == 0 and bool(finished.all() | non_finite)):
            break
        logits = step_fn(model, token[:, None], input_pos, next_pos, cache)
        # New tensors, not in-place updates: a CUDA-graph step may still hold the previous ones as inputs.
        input_pos = input_pos + 1
        next_pos = next_pos + 1
    if bool(non_finite):
        raise _non_finite("while decoding")
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
    *,
    sampling: SamplingConfig | None = None,
) -> list[str]:
    """Answer each (prompt, image) pair; returns one string per pair, the prompt not included.

    Sampling settings as in generate_ids (one by one, or `sampling=`). on_token is called with each step's token
    ids (B,); on_text (one pair only) with each new piece of text as it is generated — the pieces join to the
    returned string. compile: see generate_ids (pays on CUDA only).

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
                       max_new_tokens, do_sample, temperature, top_p, top_k, seed, on_token=step, compile=compile,
                       sampling=sampling)
    if on_text is not None and (rest := stream.finish()):
        on_text(rest)
    return [decode_text(processor.tokenizer, row, eos) for row in ids.cpu()]


def make_processor(model: PaliGemmaForConditionalGeneration, tokenizer) -> PaliGemmaProcessor:
    """The processor matching a loaded model's image size and image-token count."""
    vc = model.config.vision_config
    return PaliGemmaProcessor(tokenizer, vc.num_image_tokens, vc.image_size)
