"""int8 weight-only quantization: per-output-channel scales, quantized at load time or loaded from a saved int8
checkpoint, run by PyTorch's own int8 CPU kernel.

What is quantized: every `ops.Linear` (vision tower, projector, decoder) and the text token embedding, which is
also the tied LM head (`Int8Embedding.attend`). The embedding is the largest single matrix (257216 x 2048, a fifth
of the bytes a decoded token reads), and its per-row scale is at once the LM head's per-output-channel scale and
the lookup's per-token scale, so one int8 copy serves both. Norms, biases, the patch convolution and the vision
position embedding stay in the model's float dtype (under 0.1 % of the parameters).

Scheme: for each output row w, scale = max|w| / 127 (float32; 1 for an all-zero row; at least float32's smallest
normal number) and q = round(w / scale), within [-127, 127] (symmetric, no zero point). Kernels (`int8_linear`,
measured in benchmarks/README.md): a few tokens per sequence (decode) go to `torch._weight_int8pack_mm` with bf16
activations, which reads the int8 weights directly (its float32-activation variant is several times slower on
every CPU measured); many rows
(prefill, vision tower) convert the int8 rows to the activations' dtype in a reused buffer, run the dense float
matmul (`ops.linear`: oneDNN float32 on x86, or bf16 with AMX / AVX512-BF16), where the int8 kernel is no faster,
and scale its output columns. Elsewhere than CPU the dequantize path runs.

Saved layout (docs/quantized_checkpoint.md): one `model.safetensors` whose header metadata holds
`paligemma_quantization` = FORMAT (JSON), with `<name>.weight` int8 (out, in) and `<name>.weight_scale` float32
(out,) for each quantized module, every other tensor under its float name; config.json and the tokenizer files
beside it. Loading validates every key, dtype, shape and scale (finite, > 0).

Checked against: the reference float model (tests/test_quantize.py bounds the logits' error and the top-1
agreement on the tiny checkpoints) and ATen's `_weight_int8pack_mm` contract (mat2 (N, K) int8, scales (N,)).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import ops
import utils
import weights
from utils import CheckpointError

METHODS = ("int8",)  # what load_hf_model(quantize=...) and --quantize accept
METADATA_KEY = "paligemma_quantization"  # safetensors header metadata key of a saved int8 checkpoint
FORMAT = {"method": "int8_weight_only", "granularity": "per_output_channel", "scale_dtype": "float32",
          "version": 1}
SCALE_SUFFIX = "_scale"  # <name>.weight -> <name>.weight_scale
# Tokens per sequence up to which the int8 kernel runs (decode steps, of any batch); above it (prefill, the vision
# tower) dequantize + dense matmul. Per sequence, not in all: a decode step of B sequences is B rows, and a
# sequence must get the same arithmetic whatever batch it runs in (batched answers equal the ones alone).
INT8_KERNEL_MAX_ROWS = 16
# The many-row path converts this many bytes of weight rows at a time (output-feature blocks), so the float
# copy never exists whole: 134 MB in float32 for a 16384 x 2048 projection, 2.1 GB for the LM head — which would
# put the peak RSS of an int8 model well above its weight bytes. Smaller blocks make narrower GEMMs, which run
# slower (benchmarks/README.md: 4 MB blocks cost ~10 % more than 8 or 16 MB at a 260-token prefill); each output
# column is the same dot product (up to the GEMM's summation order).
DEQUANT_BLOCK_BYTES = 8 << 20
EMBED_NAME = "language_model.model.embed_tokens"


def check_method(quantize: str | None) -> str | None:
    """None (load as stored) or a name in METHODS; anything else is a ValueError naming the choices."""
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"--quantize must be {' or '.join(METHODS)} (or left out), got {quantize!r}")
    return quantize


# ---------------------------------------------------------------------------------------------------------------
# kernels and modules
# ---------------------------------------------------------------------------------------------------------------

def row_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |w| of each row of a float (rows, K) matrix, as float32; NaN where a row holds NaN, inf where it holds
    an infinity, so a finite result is also the proof that every value is finite. amax and amin per row are one
    pass each, ~3x faster together than vector_norm(ord=inf) (benchmarks/README.md)."""
    return torch.maximum(torch.amax(w, 1), torch.amin(w, 1).neg_()).float()  # maximum propagates NaN


def quantize_rows(w: torch.Tensor, out: torch.Tensor | None = None, amax: torch.Tensor | None = None,
                  work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, K) float -> (int8 (rows, K), float32 scale (rows,)), symmetric per row. w is never written (the
    loader passes read-only views of a file's memory map).

    out: an int8 (rows, K) tensor to write the result into; work: a float32 (rows, K) scratch for w / scale.
    Loading quantizes ~12 GB of float32 chunk by chunk, and fresh temporaries per chunk cost page faults and left
    the heap fragmented (peak RSS). amax: row_absmax(w) when the caller has it already (the loader computes it to
    check finiteness first)."""
    amax = row_absmax(w) if amax is None else amax
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row: any scale is exact
    # A subnormal max|w| would make a zero or imprecise scale: the smallest normal float keeps |w / scale| <= 127.
    scale.clamp_(min=torch.finfo(torch.float32).tiny)
    scaled = torch.div(w.float(), scale[:, None]) if work is None else torch.div(w, scale[:, None], out=work)
    # No clamp: |w| <= amax, so |w / scale| <= 127 up to float32 rounding (127.00003), which rounds to 127.
    scaled.round_()
    return (scaled.to(torch.int8) if out is None else out.copy_(scaled)), scale


def int8_as(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (N, K) -> the same integers in dtype (exact: |q| <= 127 fits every float type), in ops' reused scratch
    buffer (valid until its next use)."""
    return ops.scratch(q.shape, dtype, q.device).copy_(q)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (N, K) x scale (N,) -> the float weights (N, K) in dtype, in ops' scratch buffer (as int8_as)."""
    # Scale in place in the float copy: several times faster than torch.mul(q, scale, out=out), whose mixed-dtype
    # loop is not vectorised (benchmarks/README.md).
    return int8_as(q, dtype).mul_(scale[:, None].to(dtype))


@functools.cache
def int8_kernel_works() -> bool:
    """Whether `torch._weight_int8pack_mm` exists here and gives the right product for K a multiple of 16 (found
    once by a tiny product against float arithmetic: on an AVX2 CPU it crashes for K = 7 and is wrong for
    K = 12, so shapes it may not handle never reach it)."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 48, generator=g).to(torch.bfloat16)
        q = torch.randint(-127, 128, (32, 48), generator=g, dtype=torch.int8)
        s = torch.rand(32, generator=g) + 0.5
        got = torch._weight_int8pack_mm(x, q, s.to(torch.bfloat16)).float()
        want = (x.float() @ q.float().T) * s.to(torch.bfloat16).float()
        return bool(((got - want).abs().max() <= 2e-2 * want.abs().max()).item())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                kernel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q * scale[:, None]).T + bias, in x's dtype; picks the kernel (module docstring). kernel_scale: scale
    in bf16 if the caller keeps it (bf16_scale), else converted here."""
    rows, K = x.numel() // x.shape[-1], x.shape[-1]
    per_sequence = x.shape[-2] if x.dim() >= 3 else rows  # (B, T, K): T tokens of each of B sequences
    if (x.device.type == "cpu" and per_sequence <= INT8_KERNEL_MAX_ROWS and K % 16 == 0 and int8_kernel_works()
            and not torch.compiler.is_compiling()):
        # bf16 activations whatever x's dtype: the kernel's float32 variant is several times slower, and its
        # scales must match the activations' dtype. The result is cast back to x's dtype.
        if kernel_scale is None:
            kernel_scale = scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x.reshape(rows, K).to(torch.bfloat16), q, kernel_scale)
        y = y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)
        return y if bias is None else y + bias
    return _dequantized_linear(x, q, scale, bias)


def _dequantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                        ) -> torch.Tensor:
    """int8_linear's many-row path: dense matmuls of x with the int8 rows as floats, DEQUANT_BLOCK_BYTES of rows at
    a time, each block's output columns scaled after the product. (x @ q.T) * scale is x @ (q * scale).T: the
    scale multiplies rows x N outputs instead of N x K weights (8x fewer at a 260-token prefill, K = 2048), and
    in bf16 the weights are the exact integers rather than rounded products."""
    n, k = q.shape
    per = max(1, DEQUANT_BLOCK_BYTES // (k * x.element_size()))  # output features per block
    s = scale.to(x.dtype)

    def block(i: int, j: int) -> torch.Tensor:
        y = ops.linear(x, int8_as(q[i:j], x.dtype)).mul_(s[i:j])
        return y if bias is None else y.add_(bias[i:j])

    if per >= n:
        return block(0, n)
    # Each block's columns are written into one output (no list of pieces to join: that held the output twice).
    y = x.new_empty(*x.shape[:-1], n)
    for i in range(0, n, per):
        y[..., i:i + per] = block(i, i + per)
    return y


def bf16_scale(module: nn.Module) -> torch.Tensor:
    """module.weight_scale in bf16, as the int8 kernel takes it: converted once, not on every decode step (~1M
    values per token for PaliGemma-3B, 1.6 ms on a 2-core Zen 3), and again when weight_scale is replaced (a
    load, .to(device)) or changed in place. Kept outside the module's buffers: never saved, never moved."""
    s, cached = module.weight_scale, module.__dict__.get("_bf16_scale")
    if cached is None or cached[0] is not s or cached[1] != s._version:
        cached = module.__dict__["_bf16_scale"] = (s, s._version, s.to(torch.bfloat16))
    return cached[2]


class Int8Linear(nn.Module):
    """A Linear holding int8 weights (out, in) and float32 per-output-channel scales; same state-dict names as
    `ops.Linear` plus `weight_scale`. Computes in its input's dtype, like ops.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, ops.cast_like(self.bias, x), bf16_scale(self))


class Int8Embedding(nn.Module):
    """The token embedding in int8 with one float32 scale per row; `attend` is the tied LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding, dequantized to float32 (the caller casts to its compute dtype)."""
        return self.weight[ids].float() * self.weight_scale[ids, None]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Logits x @ embedding.T: the per-row scales are the LM head's per-output-channel scales."""
        return int8_linear(x, self.weight, self.weight_scale, kernel_scale=bf16_scale(self))


def use_int8_modules(model: nn.Module) -> None:
    """Swap every ops.Linear for an Int8Linear and the text embedding for an Int8Embedding, in place (on a model
    built on the meta device, before its weights are loaded)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            with torch.device("meta"):
                if isinstance(child, ops.Linear):
                    new = Int8Linear(child.in_features, child.out_features, child.bias is not None)
                elif f"{name}.{child_name}" == EMBED_NAME:
                    new = Int8Embedding(child.num_embeddings, child.embedding_dim)
                else:
                    continue
            setattr(module, child_name, new)


# ---------------------------------------------------------------------------------------------------------------
# loading: a float checkpoint quantized tensor by tensor, or a saved int8 checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _file_format(path: Path) -> dict | None:
    """FORMAT when this safetensors file was written by save_int8_checkpoint, None for a float file; a file that
    claims another quantization format is an error."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path.name} is truncated or not a safetensors file ({e}); re-download it") from None
    if METADATA_KEY not in meta:
        return None
    try:
        fmt = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        fmt = None
    if fmt != FORMAT:
        raise CheckpointError(f"{path.name}: quantization metadata {meta[METADATA_KEY][:200]!r} is not the format "
                              f"this version reads ({json.dumps(FORMAT)}); re-create it with quantize.py")
    return fmt


def is_int8_checkpoint(model_path: str | os.PathLike) -> bool:
    """Whether the checkpoint's weights are a saved int8 checkpoint (every weight file says so, or none does)."""
    formats = {json.dumps(_file_format(p)) for p in weights.weight_files(model_path)}
    if len(formats) > 1:
        raise CheckpointError(f"{model_path} mixes int8 and float weight files; re-create the int8 checkpoint")
    return formats != {"null"}


def _quantize_stored(reader: weights.ShardReader, key: str, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored float matrix -> (int8, scale), read in row chunks of the shard's memory map: the float matrix (2.1
    GB for the float32 embedding) never exists whole in memory."""
    src = weights.FLOAT_DTYPES[reader.header[key]["dtype"]]
    n, k = shape
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    row_bytes = k * src.itemsize
    per = max(1, reader.chunk_bytes // row_bytes)
    offset = reader.offset(key)
    for start in range(0, n, per):
        m = min(per, n - start)
        at, nbytes = offset + start * row_bytes, m * row_bytes
        rows = reader.read_bytes(at, nbytes, key, src.itemsize).view(src).view(m, k)
        amax = row_absmax(rows)
        if not bool(torch.isfinite(amax).all()):  # NaN would make a NaN scale; check_finite names what it found
            weights.check_finite(rows, f"{reader.name}: tensor {key}", src)
            # Finite as stored, infinite in float32: a float64 value beyond float32's range would make an inf scale.
            raise CheckpointError(f"{reader.name}: tensor {key} has values beyond float32's range, which int8 scales "
                                  "cannot hold; re-download the checkpoint (as it is, it loads only unquantized)")
        # w / scale in ops' reused float32 scratch (the many-row matmuls reuse it later): a fresh 16 MB buffer per
        # tensor fragmented the heap (+100 MB peak).
        work = ops.scratch(torch.Size((m, k)), torch.float32, torch.device("cpu"))
        scale[start:start + m] = quantize_rows(rows, out=q[start:start + m], amax=amax, work=work)[1]
        reader.release(at, nbytes)
    return q, scale


# Stored dtypes each kind of tensor may have: int8 weights I8, their scales F32, everything else a float type.
_KIND_DTYPES = {"int8": ("I8",), "scale": ("F32",), "float": tuple(weights.FLOAT_DTYPES)}


class _Int8Policy(weights.LoadPolicy):
    """weights.load_checkpoint's per-tensor decisions for a model prepared by use_int8_modules: from a float
    checkpoint, the weights to quantize are quantized as they are read (their scales computed, not stored); from a
    saved int8 checkpoint (keys already our names), int8 weights and scales are taken as stored."""

    missing_hint = "re-create or re-download the checkpoint"

    def __init__(self, model: nn.Module, model_path: str | os.PathLike, device: torch.device, dtype: torch.dtype):
        super().__init__(model, device, dtype)
        self.stored_int8 = is_int8_checkpoint(model_path)
        state = model.state_dict()
        self.quantized = {name for name, t in state.items() if t.dtype == torch.int8}
        self.kinds: dict[str, str] = {}  # name -> kind of tensor the file must hold (_KIND_DTYPES)
        for name in state:
            if name in self.quantized:
                self.kinds[name] = "int8" if self.stored_int8 else "float"
            elif name.endswith(".weight" + SCALE_SUFFIX):
                if not self.stored_int8:  # a float checkpoint has no scales: they are computed from its weights
                    del self.expected[name]
                    continue
                self.kinds[name] = "scale"
            else:
                self.kinds[name] = "float"

    def name(self, key: str) -> str | None:
        return key if self.stored_int8 else weights.canonical_key(key)

    def check_dtype(self, path: Path, key: str, name: str | None, stored: str) -> None:
        ok = _KIND_DTYPES[self.kinds[name]] if name in self.kinds else None  # None: the loop refuses the name
        if ok is not None and stored not in ok:
            raise CheckpointError(f"{path.name}: tensor {key} has dtype {stored}, expected {' or '.join(ok)}; "
                                  "re-create the checkpoint")

    def read(self, t: weights.StoredTensor) -> dict[str, torch.Tensor]:
        kind = self.kinds[t.name]
        if t.name in self.quantized and not self.stored_int8:
            q, scale = _quantize_stored(t.shard.reader(), t.key, t.shape)
            return {t.name: q.to(self.device), t.name + SCALE_SUFFIX: scale.to(self.device)}
        if kind == "float":
            return super().read(t)
        stored = t.shard.file.get_tensor(t.key)  # on CPU a view of the file's memory map, paged in on first use
        if kind == "scale" and not bool(((stored > 0) & torch.isfinite(stored)).all()):
            raise CheckpointError(f"{t.shard.path.name}: {t.key} holds scales that are not finite and positive; "
                                  "re-create the checkpoint")
        return {t.name: stored.to(self.device)}


def load_int8_weights(model: nn.Module, model_path: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Fill a model prepared by use_int8_modules (on meta): from a float checkpoint, each weight to quantize is
    quantized as it is read; from a saved int8 checkpoint, the int8 weights and scales are taken as stored
    (zero-copy views of the file on CPU) and every scale is checked finite and positive. Float parts go to
    `dtype`. weights.load_checkpoint's loop and checks, as for weights.load_weights; on_bytes as there."""
    weights.load_checkpoint(model, model_path, _Int8Policy(model, model_path, device, dtype), on_bytes)


# ---------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------

# Files copied beside the int8 weights: what load_config and load_tokenizer read, and the processor config.
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "preprocessor_config.json", "generation_config.json")


def save_int8_checkpoint(model: nn.Module, source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an int8 model (load_hf_model(..., quantize="int8")) as a checkpoint directory that loads without the
    float one: model.safetensors (layout in the module docstring) plus config.json and the tokenizer files copied
    from source_dir. Written into a temporary directory beside out_dir, then renamed: never half-written. Raises
    ValueError when the model is not int8 or out_dir exists."""
    import shutil

    out = Path(out_dir)
    if not any(isinstance(m, Int8Embedding) for m in model.modules()):
        raise ValueError("the model is not int8; load it with load_hf_model(..., quantize='int8') first")
    if out.exists():
        raise ValueError(f"{out} already exists; give a new directory (nothing is overwritten)")
    src = Path(source_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; give the checkpoint directory the model was loaded from")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", METADATA_KEY: json.dumps(FORMAT)})
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        umask = os.umask(0o022)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp made the directory private: give both the usual modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out_dir(out: Path) -> None:
    """OUT must be new and creatable: checked before the minutes of loading and quantizing, not after."""
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} already exists; give a new directory (nothing is overwritten)")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ValueError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {out}: {parent} is not writable; check its permissions")


def main(argv: list[str] | None = None) -> int:
    """python quantize.py SRC OUT [--dtype bfloat16]: write SRC's int8 checkpoint into the new directory OUT.
    A bad argument, checkpoint or output path is one `error:` line and exit 2, as in inference.py."""
    import argparse

    import cli_checks

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("src", help="float checkpoint directory (hub layout) or hub id")
    ap.add_argument("out", help="new directory for the int8 checkpoint")
    ap.add_argument("--dtype", default=None, help="dtype of the float parts (norms, biases); default bfloat16")
    args = ap.parse_args(argv)
    import quantize  # this file runs as __main__: the model's modules are quantize's classes, not __main__'s

    stage = "checking the arguments"
    try:
        # SIGTERM / SIGHUP unwind like Ctrl-C, so save_int8_checkpoint removes its half-written temporary directory.
        with cli_checks.stop_on_signals():
            _check_out_dir(Path(args.out))
            stage = "loading and quantizing the checkpoint"
            model, _ = utils.load_hf_model(args.src, "cpu", args.dtype, quantize="int8")
            stage = "saving the int8 checkpoint"
            print(quantize.save_int8_checkpoint(model, utils.resolve_model_path(args.src), args.out))
    except BaseException as e:  # noqa: BLE001 — every failure is one line and an exit code, never a traceback
        if isinstance(e, SystemExit):
            raise
        code, message = cli_checks.describe(e, stage)
        print(f"error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
