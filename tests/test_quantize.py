"""int8 weight-only quantization (quantize.py): the kernels compute the dequantized weights' product, the quality
bound against float32 holds on the tiny checkpoints, a saved int8 checkpoint loads alone to the same bits, and a
damaged one is refused."""

import json
import shutil

import pytest
import torch
from conftest import cli_in_process, random_image
from reference import rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ops
import quantize
import weights
from inference import generate, make_processor
from utils import CheckpointError, load_hf_model

# Quality bound on the tiny random checkpoints (logits at every prompt position, teacher-forced, against the
# float32 model): int8's relative error (Frobenius) at most this many times bf16's on the same inputs, and top-1
# agreement at least TOP1. Measured: pg1 0.065 vs bf16 0.036 (1.8x), top-1 0.87; pg2 (bf16 shards) 0.118 vs
# 0.066 (1.8x), top-1 0.74. Tiny random models amplify weight noise far more than the full-size checkpoint does
# (README's quality section).
ERR_VS_BF16 = 2.5
TOP1 = 0.65


def _frobenius_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def test_quantize_rows_round_trip_within_half_a_step():
    w = torch.randn(40, 64)
    w[3] = 0  # an all-zero row keeps a valid scale
    q, scale = quantize.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and bool((scale > 0).all())
    assert int(q.abs().max()) == 127 and int(q[3].abs().max()) == 0
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())


def test_quantize_rows_keeps_subnormal_rows_in_range():
    # A row whose max |w| is subnormal: amax / 127 would underflow to zero or lose its precision, and w / scale
    # would overflow int8. The scale is held at the smallest normal float instead.
    w = torch.tensor([[1e-44, -3e-45, 0.0], [1.0, -0.5, 0.25]])  # 1e-44 / 127 is 0 in float32
    q, scale = quantize.quantize_rows(w)
    assert bool(torch.isfinite(scale).all() & (scale > 0).all())
    assert q.abs().max() <= 127 and q[1].tolist() == [127, -64, 32]
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-45).all())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_row_absmax_shows_every_non_finite_value(value):
    w = torch.randn(4, 33)
    w[2, 17] = value
    amax = quantize.row_absmax(w)
    assert bool(torch.isfinite(amax[[0, 1, 3]]).all()) and not bool(torch.isfinite(amax[2]))
    assert torch.equal(amax[[0, 1, 3]], w[[0, 1, 3]].abs().amax(1))


@pytest.mark.parametrize("rows", [1, 5, 40])  # the int8 kernel (few rows) and the dequantize path (many)
def test_int8_linear_is_the_dequantized_product(rows):
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize.quantize_rows(torch.randn(48, 64, generator=g))
    x = torch.randn(2, rows, 64, generator=g)
    bias = torch.randn(48, generator=g)
    want = x @ (q.float() * scale[:, None]).T + bias
    got = quantize.int8_linear(x, q, scale, bias)
    assert got.shape == want.shape and got.dtype == x.dtype
    # The int8 kernel takes bf16 activations (rounding ~4e-3); the dequantize path is float32 arithmetic.
    assert rel_err(got, want) < (1e-2 if rows <= quantize.INT8_KERNEL_MAX_ROWS else 1e-5)


def test_a_decode_step_is_the_same_arithmetic_in_any_batch():
    """20 sequences x 1 token are 20 rows, more than the kernel's limit per sequence: each row must still equal
    the same sequence decoded alone, bit for bit (batched answers equal the ones alone)."""
    g = torch.Generator().manual_seed(0)
    q, scale = quantize.quantize_rows(torch.randn(48, 64, generator=g))
    x = torch.randn(20, 1, 64, generator=g).to(torch.bfloat16)
    together = quantize.int8_linear(x, q, scale)
    assert all(torch.equal(together[b], quantize.int8_linear(x[b:b + 1], q, scale)[0]) for b in range(20))


@pytest.mark.parametrize("block_rows", [1, 7, 48])  # blocks of one row, blocks with a short last one, one block
def test_many_row_path_in_blocks_is_the_whole_matrix_product(monkeypatch, block_rows):
    g = torch.Generator().manual_seed(block_rows)
    q, scale = quantize.quantize_rows(torch.randn(48, 64, generator=g))
    x, bias = torch.randn(3, 40, 64, generator=g), torch.randn(48, generator=g)
    whole = ops.linear(x, quantize.dequantize(q, scale, x.dtype), bias).clone()
    calls = []
    real = quantize.int8_as
    monkeypatch.setattr(quantize, "int8_as", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(quantize, "DEQUANT_BLOCK_BYTES", block_rows * 64 * x.element_size())
    got = quantize.int8_linear(x, q, scale, bias)
    assert calls == [min(block_rows, 48 - i) for i in range(0, 48, block_rows)]  # never more rows than a block
    # The GEMM may sum in another order for a narrow block (1 output feature): float32 rounding, no more.
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["pg1-legacy-mqa-224", "pg2-new-bf16-112"])
def test_int8_quality_bound_against_float32(checkpoint, name):
    path = checkpoint(name)
    exact, tok = load_hf_model(path, "cpu", torch.float32, progress=False)
    bf16, _ = load_hf_model(path, "cpu", torch.bfloat16, progress=False)
    int8, _ = load_hf_model(path, "cpu", quantize="int8", progress=False)
    assert isinstance(int8.language_model.model.embed_tokens, quantize.Int8Embedding)
    assert int8.dtype == torch.bfloat16  # float parts default to bf16 for int8
    inputs = make_processor(exact, tok)(text=["caption en", "answer en what is it?"],
                                        images=[random_image(1), random_image(2, (90, 30))])
    with torch.no_grad():
        want, b16, i8 = (m(**inputs)["logits"].float() for m in (exact, bf16, int8))
    err, err_bf16 = _frobenius_rel(i8, want), _frobenius_rel(b16, want)
    top1 = (i8.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{name}: int8 rel err {err:.3f} (bf16 {err_bf16:.3f}), top-1 agreement {top1:.3f}")
    assert err <= ERR_VS_BF16 * err_bf16
    assert top1 >= TOP1


def test_saved_int8_checkpoint_loads_alone_to_the_same_bits(ckpt, tmp_path):
    int8, tok = load_hf_model(ckpt, "cpu", quantize="int8", progress=False)
    out = quantize.save_int8_checkpoint(int8, ckpt, tmp_path / "int8")
    assert not list(tmp_path.glob(".int8.*")), "the temporary directory was renamed, not left behind"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[quantize.METADATA_KEY]) == quantize.FORMAT
        assert f.get_slice("language_model.model.embed_tokens.weight").get_dtype() == "I8"
    again, tok2 = load_hf_model(out, "cpu", progress=False)  # no quantize=: the file says it is int8
    a, b = int8.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    inputs = make_processor(again, tok2)(text=["caption en"], images=[random_image(7)])
    with torch.no_grad():
        assert torch.equal(again(**inputs)["logits"], int8(**inputs)["logits"])
    with pytest.raises(ValueError, match="already exists"):
        quantize.save_int8_checkpoint(int8, ckpt, out)


def _damaged(src, dst, edit):
    """A copy of the int8 checkpoint src whose tensors (and metadata) went through edit(tensors, metadata)."""
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    edit(tensors, meta)
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def int8_ckpt(ckpt, tmp_path_factory):
    """The default tiny checkpoint saved as int8 (shared: copy it before changing anything)."""
    int8, _ = load_hf_model(ckpt, "cpu", quantize="int8", progress=False)
    return quantize.save_int8_checkpoint(int8, ckpt, tmp_path_factory.mktemp("int8") / "ckpt")


SCALE = "language_model.model.layers.0.mlp.up_proj.weight_scale"


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: t[SCALE].__setitem__(0, -1.0), "not finite and positive"),
    (lambda t, m: t[SCALE].__setitem__(1, float("nan")), "not finite and positive"),
    (lambda t, m: t.pop(SCALE), "is missing"),
    (lambda t, m: t.__setitem__(SCALE[:-6], t[SCALE[:-6]].float()), "expected I8"),
    (lambda t, m: t.__setitem__(SCALE, t[SCALE].to(torch.bfloat16)), "expected F32"),
    (lambda t, m: t.__setitem__("extra.weight", torch.zeros(2)), "unexpected tensor extra.weight"),
    (lambda t, m: m.__setitem__(quantize.METADATA_KEY, '{"method": "int4"}'), "not the format"),
])
def test_damaged_int8_checkpoint_is_refused(int8_ckpt, tmp_path, edit, message):
    bad = _damaged(int8_ckpt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(bad, "cpu", progress=False)


def test_cli_quantize_int8_answers_as_the_library(ckpt, capsys):
    image = random_image(3)
    path = ckpt.parent / "quantize-cli.png"
    image.save(path)
    model, tok = load_hf_model(ckpt, "cpu", quantize="int8", progress=False)
    want = generate(model, make_processor(model, tok), "caption en", image, 8)[0]
    code, out, err = cli_in_process(capsys, "--model_path", ckpt, "-i", path, "-p", "caption en",
                                    "--max_tokens_to_generate", 8, "--quantize", "int8")
    assert code == 0, err
    assert out.rstrip("\n") == want
    assert "as torch.bfloat16" in err
    code, out, err = cli_in_process(capsys, "--model_path", ckpt, "-i", path, "--quantize", "int4")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --quantize must be int8 (or left out), got 'int4'"


def test_a_float64_value_beyond_float32s_range_is_named(ckpt, tmp_path):
    """Finite as stored (float64), infinite in float32: the int8 scale would be inf and the model all NaN."""
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    path = next(p for p in weights.weight_files(dst) if any(k.endswith("up_proj.weight") for k in load_file(str(p))))
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith("up_proj.weight"))[0]
    tensors[key] = tensors[key].double()
    tensors[key][0, 0] = 1e39
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {key} has values beyond float32's range"):
        load_hf_model(dst, "cpu", quantize="int8", progress=False)


def test_quantize_cli_checks_the_output_before_loading(ckpt, tmp_path, monkeypatch, capsys):
    """An existing OUT is one error line and exit 2, before minutes of loading; so is a bad SRC."""
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(quantize.utils, "load_hf_model", lambda *a, **k: pytest.fail("loaded before checking OUT"))
    assert quantize.main([str(ckpt), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'out'} already exists")
    monkeypatch.undo()
    assert quantize.main([str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not (tmp_path / "new").exists()


def test_the_kernels_bf16_scales_are_converted_once_and_follow_the_scales():
    layer = quantize.Int8Linear(64, 48, bias=False)
    q, scale = quantize.quantize_rows(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)))
    layer.weight, layer.weight_scale = q, scale
    first = quantize.bf16_scale(layer)
    assert quantize.bf16_scale(layer) is first and torch.equal(first, scale.to(torch.bfloat16))
    layer.weight_scale.mul_(2)  # changed in place
    assert torch.equal(quantize.bf16_scale(layer), (scale).to(torch.bfloat16))
    layer.weight_scale = scale * 3  # replaced
    assert torch.equal(quantize.bf16_scale(layer), (scale * 3).to(torch.bfloat16))
    x = torch.randn(1, 1, 64)
    assert torch.equal(layer(x), quantize.int8_linear(x, layer.weight, layer.weight_scale))
