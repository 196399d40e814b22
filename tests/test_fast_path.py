"""The fast paths give the same answers: compiled decode step, float32 prefill of bf16 weights, sparse EOS checks."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_no_near_ties, random_image
from reference import hf_model, rel_err

import generation
import ops
from inference import auto_prefill_dtype, generate_ids, make_processor, prefill
from utils import load_hf_model

PROMPTS = ["caption en", "answer en how many animals are there in this photo?"]


def _batch(proc):
    return proc(text=PROMPTS, images=[random_image(30), random_image(31, (90, 20))])


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@pytest.mark.parametrize("name", ["pg1-legacy-mqa-224", "pg2-legacy-gqa-224"])
def test_compiled_decode_matches_eager_and_transformers(checkpoint, name):
    """fullgraph=True: the decode step has no graph break, which is what lets CUDA replay it as one graph."""
    path = checkpoint(name)
    model, tok = load_hf_model(path, "cpu")
    inputs = _batch(make_processor(model, tok))
    assert inputs["attention_mask"].min() == 0  # a left-padded batch: masks and positions are exercised
    args = (model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 24)
    eager = generate_ids(*args)
    compiled = generate_ids(*args, compile=True)
    ref = hf_model(path)
    for b in range(2):
        keep = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b, keep][None]
        with torch.no_grad():
            theirs = ref.generate(input_ids=ids, pixel_values=inputs["pixel_values"][b:b + 1],
                                  token_type_ids=torch.zeros_like(ids), max_new_tokens=24, do_sample=False)
        theirs = theirs[0, ids.shape[1]:].tolist()
        assert_no_near_ties(model, ids, inputs["pixel_values"][b:b + 1], theirs)
        assert compiled[b, : len(theirs)].tolist() == theirs
        assert len(set(theirs)) >= 4, "degenerate reference output proves little"
    assert compiled.tolist() == eager.tolist()


def test_float32_prefill_of_bf16_weights_is_float32_arithmetic(ckpt):
    """bf16 weights prefilled with compute_dtype=float32 match a float32 model holding the same (bf16-rounded)
    weights far more closely than the bf16 prefill does: the arithmetic really ran in float32."""
    bf16, tok = load_hf_model(ckpt, "cpu", torch.bfloat16)
    exact, _ = load_hf_model(ckpt, "cpu", torch.float32)
    with torch.no_grad():
        for p_exact, p_bf16 in zip(exact.parameters(), bf16.parameters(), strict=True):
            p_exact.copy_(p_bf16.float())  # the same weights, exactly representable in both
    inputs = make_processor(bf16, tok)(text=[PROMPTS[0]], images=[random_image(5)])
    T = inputs["input_ids"].shape[1]
    pos = torch.arange(T)[None]

    def run(model, dtype):
        cache = model.new_kv_cache(1, T + 1)
        with torch.no_grad():
            return prefill(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], cache,
                           pos, dtype)

    want = run(exact, torch.float32)
    err_fp32 = rel_err(run(bf16, torch.float32), want)
    err_bf16 = rel_err(run(bf16, torch.bfloat16), want)
    print(f"bf16 weights: float32 prefill rel err {err_fp32:.2e}, bf16 prefill {err_bf16:.2e}")
    # Not 0: the KV cache stays bf16 and the LM head reads the bf16 embedding with bf16-rounded activations.
    assert err_fp32 < 2e-2
    assert err_fp32 < err_bf16 / 2


def test_auto_prefill_dtype_follows_the_cpu(ckpt, monkeypatch):
    fp32, _ = load_hf_model(ckpt, "cpu", torch.float32)
    bf16, _ = load_hf_model(ckpt, "cpu", torch.bfloat16)
    fp16, _ = load_hf_model(ckpt, "cpu", torch.float16)
    assert auto_prefill_dtype(fp32) == torch.float32
    monkeypatch.setattr(ops, "cpu_has_bf16_arithmetic", lambda: True)
    assert auto_prefill_dtype(bf16) == torch.bfloat16
    assert auto_prefill_dtype(fp16) == torch.float32  # no CPU has fast fp16 matmuls in oneDNN
    monkeypatch.setattr(ops, "cpu_has_bf16_arithmetic", lambda: False)
    assert auto_prefill_dtype(bf16) == torch.float32


def test_sparse_eos_checks_give_the_same_ids(ckpt, monkeypatch):
    """On an accelerator EOS is checked every 8 steps (no host sync per token); rows that ended meanwhile only
    get padding. Force that schedule on the CPU: every row's ids up to its EOS must be unchanged."""
    model, tok = load_hf_model(ckpt, "cpu")
    inputs = _batch(make_processor(model, tok))
    every_step = generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 40)
    # Make a token of row 0's greedy output the EOS, so that row stops early and the other does not.
    eos = every_step[0, 5].item()
    args = (model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 40)
    dense = generate_ids(*args, eos_token_ids=[eos], pad_token_id=0)
    monkeypatch.setitem(generation._EOS_CHECK_EVERY, "cpu", 8)
    sparse = generate_ids(*args, eos_token_ids=[eos], pad_token_id=0)
    assert sparse.shape[1] >= dense.shape[1]
    assert torch.equal(sparse[:, : dense.shape[1]], dense)
    assert (sparse[:, dense.shape[1]:] == 0).all()  # only padding after the last EOS


def _diverges_only_at_a_near_tie(a, b, prompt_ids, pixel_values, ids_a: list[int], ids_b: list[int]) -> None:
    """Greedy ids of models a and b for one unpadded prompt: equal, or at the first step where they differ, a's
    margin between the two choices is within twice the models' largest logit difference there (teacher-forced)."""
    n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), None)
    if n is None:
        return
    T = prompt_ids.shape[1]
    full = torch.cat([prompt_ids, torch.tensor([ids_a[:n]], dtype=prompt_ids.dtype)], 1)
    with torch.no_grad():
        la, lb = (m(full, pixel_values, prefix_len=T)["logits"][0, -1].float() for m in (a, b))
    diff = (la - lb).abs().max().item()
    margin = (la[ids_a[n]] - la[ids_b[n]]).item()
    assert margin <= 2 * diff, f"step {n}: {ids_a[n]} vs {ids_b[n]}, margin {margin:.3f} > 2 x difference {diff:.3f}"


@pytest.mark.skipif(not ops.onednn_enabled() or not ops.can_pack_bf16(),
                    reason="oneDNN's bf16 weight packing needs an x86 CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT")
def test_packed_bf16_weights_give_the_dense_results(checkpoint, monkeypatch):
    """pack_linear_weights only changes the memory layout: the packed weights hold the dense weights' bits (checked
    exactly), and the float32 prefill (which unpacks) still works. The arithmetic may differ in summation order:
    packed and plain weights can take different oneDNN kernels (bit-identical on the AVX-512 EPYC where packing
    was first measured; not promised elsewhere), and the tiny fixtures amplify a last-bit bf16 difference to
    percents. So the packed logits must be as close to the float32 model's as the dense bf16 ones (within twice
    their error, measured here on this CPU), and the greedy ids equal to the dense ones up to a near tie.
    load_hf_model packs by default only where it pays."""
    path = checkpoint("pg2-legacy-gqa-224")
    dense, tok = load_hf_model(path, "cpu", torch.bfloat16, pack=False)
    packed, _ = load_hf_model(path, "cpu", torch.bfloat16, pack=True)
    exact, _ = load_hf_model(path, "cpu", torch.float32)
    assert not any(p.is_mkldnn for p in dense.parameters())
    n_linear = sum(isinstance(m, ops.Linear) for m in packed.modules())
    assert sum(p.is_mkldnn for p in packed.parameters()) == n_linear
    with torch.no_grad():
        for (name, d), (_, p), (_, e) in zip(dense.named_parameters(), packed.named_parameters(),
                                             exact.named_parameters(), strict=True):
            assert torch.equal(d, p.to_dense() if p.is_mkldnn else p), name  # the same bits, another layout
            e.copy_(d.float())  # the float32 model holds exactly the bf16 weights
    inputs = _batch(make_processor(dense, tok))
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    real = inputs["attention_mask"].bool()  # padded positions hold no answer
    with torch.no_grad():
        want, got_dense, got_packed = (m(*args)["logits"][real].float() for m in (exact, dense, packed))
    err_dense, err_packed = rel_err(got_dense, want), rel_err(got_packed, want)
    print(f"bf16 logits vs float32: dense {err_dense:.2e}, packed {err_packed:.2e}")
    assert err_packed <= 2 * err_dense
    ids_dense, ids_packed = generate_ids(dense, *args, 16), generate_ids(packed, *args, 16)
    for b in range(2):
        _diverges_only_at_a_near_tie(dense, packed, args[0][b, real[b]][None], args[1][b:b + 1],
                                     ids_dense[b].tolist(), ids_packed[b].tolist())
    assert generate_ids(packed, *args, 4, prefill_dtype=torch.float32).shape == (2, 4)
    # pack=None (what the CLI passes): only bf16 on a CPU with bf16 arithmetic; the Python default stays dense.
    assert not any(p.is_mkldnn for p in load_hf_model(path, "cpu", torch.bfloat16)[0].parameters())
    monkeypatch.setattr(ops, "cpu_has_bf16_arithmetic", lambda: False)
    assert not any(p.is_mkldnn for p in load_hf_model(path, "cpu", torch.bfloat16, pack=None)[0].parameters())
    monkeypatch.setattr(ops, "cpu_has_bf16_arithmetic", lambda: True)
    assert any(p.is_mkldnn for p in load_hf_model(path, "cpu", torch.bfloat16, pack=None)[0].parameters())
    assert not any(p.is_mkldnn for p in load_hf_model(path, "cpu", torch.float32, pack=None)[0].parameters())


def test_onednn_off_switch_also_stops_packing(checkpoint, monkeypatch):
    """ops.ONEDNN_LINEAR = False means ATen's kernels everywhere: it is read at call time, so load_hf_model(pack=None)
    stops packing too (a copy taken at import once kept packing on)."""
    monkeypatch.setattr(ops, "cpu_has_bf16_arithmetic", lambda: True)
    monkeypatch.setattr(ops, "can_pack_bf16", lambda: True)
    cpu = torch.device("cpu")
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", True)
    assert ops.packing_pays(cpu, torch.bfloat16)
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", False)
    assert not ops.packing_pays(cpu, torch.bfloat16)
    path = checkpoint("pg2-legacy-gqa-224")
    assert not any(p.is_mkldnn for p in load_hf_model(path, "cpu", torch.bfloat16, pack=None)[0].parameters())


def test_compile_compiles_the_prefill_on_cuda_only():
    """compile=True: the prefill goes through torch.compile where it is launch-bound (CUDA), stays eager elsewhere
    (tests/test_cuda.py runs the compiled prefill against eager on a GPU)."""
    import generation

    on = lambda kind: SimpleNamespace(device=torch.device(kind))  # noqa: E731 — only .device is read
    assert generation.prefill_fn(on("cpu"), True) is generation.prefill
    assert generation.prefill_fn(on("cuda"), False) is generation.prefill
    compiled = generation.prefill_fn(on("cuda"), True)
    assert compiled is not generation.prefill and compiled is generation.prefill_fn(on("cuda"), True)


@pytest.mark.parametrize("images", [1, ops.PACK_MIN_ANSWERS])
def test_cli_packs_only_for_runs_of_many_answers(ckpt, tmp_path, capsys, monkeypatch, images):
    """Packing costs seconds of load that one caption never earns back (ops.PACK_MIN_ANSWERS): a one-image run
    loads dense weights (pack=False); a folder of PACK_MIN_ANSWERS images lets load_hf_model pack where the CPU
    can (pack=None)."""
    from conftest import cli_in_process

    import inference

    for i in range(images):
        random_image(i, (32, 32)).save(tmp_path / f"{i:02d}.png")
    asked = []
    real = inference.load_hf_model
    monkeypatch.setattr(inference, "load_hf_model", lambda *a, **k: asked.append(k["pack"]) or real(*a, **k))
    target = tmp_path / "00.png" if images == 1 else tmp_path
    code, _, err = cli_in_process(capsys, "--model_path", ckpt, "--prompt", "caption en", "--image_file_path",
                                  target, "--max_tokens_to_generate", "1")
    assert code in (0, None), err
    assert asked == [False if images == 1 else None]
