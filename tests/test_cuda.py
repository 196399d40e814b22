"""The CUDA path against transformers on the same GPU: float32 parity, bf16 greedy tokens, compiled decode (CUDA
graphs), batching, and the command line on --device cuda.

Marked `cuda`: skipped where CUDA is absent; run them alone with `python -m pytest -q -m cuda`
(`benchmarks/gpu_check.py` does, first thing). `PALIGEMMA_TEST_DEVICE=cpu python -m pytest -q -m cuda` runs the
same tests on the CPU, which is how their own logic is checked on machines without a GPU.

bf16 tokens: two correct bf16 implementations differ in the last bits of intermediate results (another GEMM
tiling or attention length sums in another order), and the tiny fixtures' deliberately chaotic weights amplify
that: their bf16 logits sit ~10% of the largest logit away from float32, ours and transformers' a few % apart. So
the bf16 comparison is teacher-forced: transformers generates 32 greedy tokens; we run the same 32 steps through
our prefill and cached decode on those tokens; at every step our logits must lie within BF16_TOL of its and our
greedy choice must be its token, unless its own margin between the two tokens is within twice the measured
difference (a near-tie the rounding can break either way). A real bug (a wrong mask, scale, norm, cast or cache
slot) moves logits by far more; the float32 tests bound the arithmetic at 1e-5.
"""

import os

import pytest
import torch
from conftest import CHECKPOINTS, random_image, run_cli
from reference import rel_err

from inference import decode_one_token, generate, generate_ids, make_processor, prefill
from utils import load_hf_model

DEVICE = os.environ.get("PALIGEMMA_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"),
]
TOL = 1e-5  # float32 with TF32 off: the same bound as the CPU parity tests
BF16_TOL = 0.05  # of the largest logit: twice what ours vs transformers measured on the fixtures, half bf16 vs fp32
PROMPTS = ["caption en", "answer en what is in the picture?"]
COMPILED = ["pg1-legacy-mqa-224", "pg2-legacy-gqa-224"]  # PaliGemma 1 (MQA) and 2 (GQA, window, softcap)


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    """TF32 off: float32 matmuls on Ampere+ otherwise round inputs to 10 mantissa bits (~1e-3 relative)."""
    if not DEVICE.startswith("cuda"):
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def hf_on_device(path, dtype):
    import transformers

    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    return model.to(DEVICE).eval()


def hf_greedy(ref, inputs, n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens for one unpadded row (stopping at EOS) and its logits per step (n', V)."""
    ids = inputs["input_ids"].to(DEVICE)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=inputs["pixel_values"].to(DEVICE, ref.dtype),
                           token_type_ids=torch.zeros_like(ids), max_new_tokens=n, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits, 1)[0].float().cpu()


def teacher_forced_logits(model, inputs, tokens: list[int]) -> torch.Tensor:
    """Our logits (n, V) for each of `tokens` given the ones before it: bf16 prefill, then cached decode steps."""
    ids = inputs["input_ids"].to(DEVICE)
    T = ids.shape[1]
    new = torch.tensor([tokens], device=DEVICE)
    with torch.no_grad():
        cache = model.new_kv_cache(1, T + len(tokens))
        out = [prefill(model, ids, inputs["pixel_values"].to(DEVICE), inputs["attention_mask"].to(DEVICE), cache,
                       torch.arange(T, device=DEVICE)[None], model.dtype)]
        for i in range(len(tokens) - 1):
            at = torch.tensor([T + i], device=DEVICE)
            out.append(decode_one_token(model, new[:, i:i + 1], at, at[None], cache))
    return torch.stack(out, 1)[0].float().cpu()


def assert_choices_match_up_to_near_ties(ours: torch.Tensor, ref: torch.Tensor, what: str) -> int:
    """Per step (rows of the (n, V) logits): within BF16_TOL of the reference, and the same argmax unless the
    reference's margin between the two choices is within twice the measured difference. Returns the number of
    steps whose argmax differed (explained near-ties)."""
    ties = 0
    for step in range(ref.shape[0]):
        diff = (ours[step] - ref[step]).abs().max().item()
        scale = ref[step].abs().max().item()
        assert diff <= BF16_TOL * scale, f"{what} step {step}: logits differ by {diff:.3f} (largest {scale:.2f})"
        a, b = int(ours[step].argmax()), int(ref[step].argmax())
        if a != b:
            margin = (ref[step, b] - ref[step, a]).item()
            assert margin <= 2 * diff, (f"{what} step {step}: we pick {a}, the reference {b}, whose margin {margin:.3f}"
                                        f" exceeds twice the logit difference {diff:.3f}")
            ties += 1
    return ties


def agreement(ours: list[int], theirs: list[int]) -> int:
    """How many leading tokens two free-running greedy generations share."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_float32_prefill_and_cached_decode_match_transformers(checkpoint, name):
    path = checkpoint(name)
    model, tok = load_hf_model(path, DEVICE, torch.float32)
    ref = hf_on_device(path, torch.float32)
    inputs = make_processor(model, tok)(text=[PROMPTS[1]], images=[random_image(3)])
    steps = 10
    ids = inputs["input_ids"].to(DEVICE)
    theirs_tokens, ref_logits = hf_greedy(ref, inputs, steps)
    T = ids.shape[1]
    new = torch.tensor([theirs_tokens], device=DEVICE)
    with torch.no_grad():
        cache = model.new_kv_cache(1, T + steps)
        pos = torch.arange(T, device=DEVICE)[None]
        ours = [prefill(model, ids, inputs["pixel_values"].to(DEVICE), inputs["attention_mask"].to(DEVICE), cache,
                        pos)]
        for i in range(len(theirs_tokens) - 1):
            at = torch.tensor([T + i], device=DEVICE)
            ours.append(decode_one_token(model, new[:, i:i + 1], at, at[None], cache))
    ours = torch.stack(ours, 1)[0].cpu()
    errs = [rel_err(ours[i], ref_logits[i]) for i in range(len(ours))]
    print(f"{name} float32 on {DEVICE}: prefill rel err {errs[0]:.2e}, decode max {max(errs):.2e}")
    assert max(errs) < TOL


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_bf16_greedy_tokens_match_transformers_bf16(checkpoint, name):
    path = checkpoint(name)
    model, tok = load_hf_model(path, DEVICE, torch.bfloat16)
    ref = hf_on_device(path, torch.bfloat16)
    proc = make_processor(model, tok)
    report = []
    for seed, prompt in enumerate(PROMPTS):
        inputs = proc(text=[prompt], images=[random_image(10 + seed, (30, 70))])
        theirs, ref_logits = hf_greedy(ref, inputs, 32)
        assert len(set(theirs)) >= 4, f"{name}: degenerate reference output {theirs}"
        ours = teacher_forced_logits(model, inputs, theirs)
        ties = assert_choices_match_up_to_near_ties(ours, ref_logits, f"{name} {prompt!r}")
        free = generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 32,
                            prefill_dtype=torch.bfloat16)[0].tolist()
        report.append(f"{len(theirs) - ties}/{len(theirs)} steps same choice, free-running first "
                      f"{agreement(free, theirs)} identical")
    print(f"{name} bf16 on {DEVICE}: " + "; ".join(report))


def _through_eos(row: list[int], eos: list[int]) -> int:
    """Length of a generated row up to and including its first EOS (the rest is padding)."""
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


def _padded_batch(proc):
    prompts = ["caption en", "answer en how many animals are there in this photo?", "detect cat ; dog"]
    images = [random_image(20), random_image(21, (90, 20)), random_image(22, (33, 33))]
    batch = proc(text=prompts, images=images)
    assert batch["attention_mask"].min() == 0  # left padding is exercised
    return prompts, images, batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_decode_equals_eager(checkpoint, name, dtype):
    """compile=True: the decode step as one CUDA graph per token (torch.compile "reduce-overhead"), run twice so the
    second call replays the recorded graph on the reused static cache."""
    model, tok = load_hf_model(checkpoint(name), DEVICE, dtype)
    _, _, batch = _padded_batch(make_processor(model, tok))
    args = (model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], 24)
    eager = generate_ids(*args)
    first = generate_ids(*args, compile=True)
    again = generate_ids(*args, compile=True)
    assert torch.equal(first, again)
    if dtype == torch.float32:
        assert first.tolist() == eager.tolist()
    else:  # inductor fuses the pointwise ops between matmuls: bf16 roundings differ, compare as with transformers
        with torch.no_grad():
            for b in range(first.shape[0]):
                n = _through_eos(eager[b].tolist(), model.config.eos_token_id)
                keep = batch["attention_mask"][b].bool()
                row = torch.cat([batch["input_ids"][b, keep].to(DEVICE), eager[b, :n]])[None]
                logits = model(row, batch["pixel_values"][b:b + 1].to(DEVICE), prefix_len=int(keep.sum()))["logits"]
                ref_logits = logits[0, int(keep.sum()) - 1:-1].float().cpu()  # eager's logits at each new token
                step = agreement(first[b, :n].tolist(), eager[b, :n].tolist())
                if step < n:  # the first divergence must be a choice between two tokens within bf16 noise
                    gap = (ref_logits[step].max() - ref_logits[step, first[b, step]]).item()
                    assert gap <= BF16_TOL * ref_logits[step].abs().max().item(), f"{name} row {b} step {step}"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", COMPILED)
def test_batched_equals_one_by_one(checkpoint, name, compile):
    model, tok = load_hf_model(checkpoint(name), DEVICE, torch.float32)
    proc = make_processor(model, tok)
    prompts, images, batch = _padded_batch(proc)
    together = generate_ids(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], 16,
                            compile=compile)
    for b in range(len(prompts)):
        one = proc(text=[prompts[b]], images=[images[b]])
        alone = generate_ids(model, one["input_ids"], one["pixel_values"], one["attention_mask"], 16,
                             compile=compile)[0]
        assert together[b, : len(alone)].tolist() == alone.tolist(), f"{name} row {b}"


@pytest.mark.parametrize("extra", [[], ["--compile", "True"]], ids=["eager", "compiled"])
def test_cli_on_device_prints_what_python_generate_returns(checkpoint, tmp_path, extra):
    """The command line with --device (bf16, the CUDA default) against generate() in this process."""
    path = checkpoint("pg2-legacy-gqa-224")
    image = tmp_path / "img.png"
    random_image(42, (80, 60)).save(image)
    run = run_cli("--model_path", path, "--prompt", "caption en", "--image_file_path", image,
                  "--max_tokens_to_generate", "40", "--device", DEVICE, "--dtype", "bfloat16", *extra, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"on {torch.device(DEVICE)}" in run.stderr or f"on {DEVICE}" in run.stderr, run.stderr
    from inference import load_image

    model, tok = load_hf_model(path, DEVICE, torch.bfloat16)
    expected = generate(model, make_processor(model, tok), ["caption en"], [load_image(str(image))], 40,
                        compile=bool(extra))[0]
    assert expected.strip(), "the fixture should answer something"
    assert run.stdout == expected + "\n"
