"""Fine-tuning parity with transformers (float64, PaliGemma 1 and 2 tiny hub-layout checkpoints (112 px: 64 image
tokens keep these backward passes quick; the PaliGemma 2 one is stored in bfloat16, exactly widened), a batch of two
whose suffixes differ in length so one row is left-padded): the loss, every parameter's gradient, the weights
after one AdamW step; the prefix-LM mask's leak tests; the per-example loss; the presets; LoRA vs transformers +
peft with identical adapter weights.

transformers' own loss casts the logits to float32 (`logits.float()` in ForCausalLMLoss), even for a float64
model, so it agrees with ours only to float32 precision; the 1e-9 comparison and the gradients use its float64
logits with its own `fixed_cross_entropy` (the same function, without the cast) on the shifted labels.
"""

import copy
import functools

import pytest
import torch
from conftest import random_image
from reference import hf_model
from transformers.loss.loss_utils import fixed_cross_entropy

from generation import make_processor
from training import (
    PRESETS,
    TrainingError,
    apply_preset,
    causal_lm_loss,
    load_adapter,
    lora_config,
    merge_lora,
    save_adapter,
    training_loss,
)
from utils import canonical_key, load_hf_model

LOSS_TOL, GRAD_TOL, WEIGHT_TOL = 1e-9, 1e-7, 1e-7
PROMPTS = ["caption en", "answer en what is on the beach?"]
SUFFIXES = ["a cow standing on the sand near the water at dusk", "two dogs"]


@functools.cache
def _pair(path):
    model, tok = load_hf_model(path, "cpu", torch.float64, progress=False)
    batch = make_processor(model, tok)(text=PROMPTS, images=[random_image(1), random_image(2, (40, 90))],
                                       suffix=SUFFIXES)
    batch["pixel_values"] = batch["pixel_values"].double()
    assert not batch["attention_mask"].bool().all(), "the batch must hold a padded row"
    return model, hf_model(path).to(torch.float64), batch


@pytest.fixture(scope="module", params=["pg1-new-gqa-112", "pg2-new-bf16-112"])
def pair(request, checkpoint):
    """(our float64 model, transformers' float64 model, a training batch) for one checkpoint."""
    return _pair(checkpoint(request.param))


@pytest.fixture(scope="module")
def pg2_pair(checkpoint):
    """The same for PaliGemma 2 alone, for tests whose code path does not depend on the family."""
    return _pair(checkpoint("pg2-new-bf16-112"))


def reference_loss(ref, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 loss, transformers' own float32 loss) of transformers' model on the batch."""
    out = ref(**batch)
    logits = out.logits
    loss = fixed_cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    return loss, out.loss


def matched_parameters(model, ref) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, ours, theirs) for every parameter of ours, paired through the checkpoint key names."""
    ours = dict(model.named_parameters())
    theirs = {canonical_key(n): p for n, p in ref.named_parameters()}
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    return [(n, p, theirs[n]) for n, p in ours.items()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_loss_gradients_and_adamw_step_match_transformers(pair):
    model, ref, batch = pair
    model, ref = copy.deepcopy(model).requires_grad_(True), copy.deepcopy(ref)
    with torch.no_grad():
        forward_loss = model(**batch)["loss"]
    loss = training_loss(model, batch)  # what finetune.py backpropagates: the LM head on labelled positions only
    ref_loss, hf_own_loss = reference_loss(ref, batch)
    assert loss.dtype == torch.float64
    assert abs(forward_loss.item() / ref_loss.item() - 1) < LOSS_TOL
    print(f"loss {loss.item():.15f} vs {ref_loss.item():.15f}: rel {abs(loss.item() / ref_loss.item() - 1):.1e}")
    assert abs(loss.item() / ref_loss.item() - 1) < LOSS_TOL
    assert abs(loss.item() / hf_own_loss.item() - 1) < 1e-6  # transformers' loss is float32 (see the docstring)
    loss.backward()
    ref_loss.backward()
    pairs = matched_parameters(model, ref)
    worst = 0.0
    for name, ours, theirs in pairs:
        assert theirs.grad is not None and theirs.grad.abs().max() > 0, name
        err = rel(ours.grad, theirs.grad)
        worst = max(worst, err)
        assert err < GRAD_TOL, f"{name}: gradient rel err {err:.1e}"
    print(f"worst gradient rel err {worst:.1e}")
    # One AdamW step on each side: the weights still agree, and moved far more than the tolerance.
    before = {n: p.detach().clone() for n, p, _ in pairs}
    for params in ([p for _, p, _ in pairs], [t for _, _, t in pairs]):
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01).step()
    worst = max(rel(ours.detach(), theirs.detach()) for _, ours, theirs in pairs)
    print(f"after one AdamW step: worst weight rel err {worst:.1e}")
    assert worst < WEIGHT_TOL
    assert max(rel(p.detach(), before[n]) for n, p, _ in pairs) > 1e3 * WEIGHT_TOL


def _logits_of_variants(model, batch, row: int, changes: list[tuple[list[int], int]]) -> torch.Tensor:
    """Logits of `row` with each change (positions, new token) applied, all variants in one batch (K, T, V)."""
    ids = batch["input_ids"][row].repeat(len(changes), 1)
    for k, (positions, token) in enumerate(changes):
        ids[k, positions] = token
    def rep(t):
        return t[row:row + 1].expand(len(changes), *t.shape[1:])
    with torch.no_grad():
        return model(ids, rep(batch["pixel_values"]), rep(batch["attention_mask"]),
                     token_type_ids=rep(batch["token_type_ids"]))["logits"]


def test_no_leak_through_the_prefix_lm_mask(pair):
    """Changing suffix token t+1 changes no logit at positions <= t (every t); changing the whole suffix changes
    no prefix logit; changing the last prompt token does change the first image position's (bidirectional)."""
    model, _, batch = pair
    row = 0  # the unpadded row: its suffix is the longer one
    suffix = batch["token_type_ids"][row].nonzero()[:, 0].tolist()
    first, prompt_end = suffix[0], suffix[0] - 1  # prompt_end: the "\n" closing the prompt
    changes = [([0], int(batch["input_ids"][row, 0]))]  # variant 0: unchanged
    changes += [([t + 1], 5) for t in suffix[:-1]]
    changes += [(suffix, 7), ([prompt_end - 1], 5)]
    logits = _logits_of_variants(model, batch, row, changes)
    base = logits[0]
    for k, t in enumerate(suffix[:-1], start=1):
        assert torch.equal(logits[k, :t + 1], base[:t + 1]), f"suffix token {t + 1} leaked into position <= {t}"
        assert not torch.equal(logits[k, t + 1:], base[t + 1:])
    assert torch.equal(logits[-2, :first], base[:first])
    assert not torch.equal(logits[-1, 0], base[0])


def test_without_token_type_ids_nothing_changes(pg2_pair):
    """An unpadded prompt with token_type_ids all 0 is the prefill's one bidirectional block, bit for bit."""
    model, _, batch = pg2_pair
    keep = batch["token_type_ids"][1] == 0
    keep &= batch["attention_mask"][1].bool()
    ids = batch["input_ids"][1, keep][None]
    with torch.no_grad():
        plain = model(ids, batch["pixel_values"][1:])["logits"]
        typed = model(ids, batch["pixel_values"][1:], token_type_ids=torch.zeros_like(ids))["logits"]
    assert torch.equal(plain, typed)


def test_per_example_loss_is_big_vision_s(pg2_pair):
    model, _, batch = pg2_pair
    with torch.no_grad():
        logits = model(**batch)["logits"]
        lean = training_loss(model, batch, reduction="example")
    per_row = [causal_lm_loss(logits[b:b + 1], batch["labels"][b:b + 1]) for b in range(2)]
    example = causal_lm_loss(logits, batch["labels"], reduction="example")
    assert abs(lean.item() / example.item() - 1) < 1e-12
    assert abs(example.item() / ((per_row[0] + per_row[1]) / 2).item() - 1) < 1e-12
    token = causal_lm_loss(logits, batch["labels"])
    n = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    assert n[0] != n[1] and abs(token.item() / ((per_row[0] * n[0] + per_row[1] * n[1]) / sum(n)).item() - 1) < 1e-12
    with pytest.raises(TrainingError, match="unknown loss reduction"):
        causal_lm_loss(logits, batch["labels"], reduction="sum")


@pytest.mark.parametrize("preset", PRESETS[:3])
def test_presets_train_what_they_say(pg2_pair, preset):
    model, _, _ = pg2_pair
    model = apply_preset(copy.deepcopy(model), preset)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    expected = {
        "full": names,
        "llm": {n for n in names if n.startswith("language_model.")},
        "attn": {n for n in names if n.startswith("language_model.model.layers.") and ".self_attn." in n},
    }[preset]
    assert trained == expected and trained


def test_unknown_preset_is_a_clear_error(pg2_pair):
    with pytest.raises(TrainingError, match="unknown preset 'bias'"):
        apply_preset(pg2_pair[0], "bias")


def test_lora_matches_transformers_with_peft(pg2_pair):
    """The same peft LoraConfig on both models, transformers' adapter weights copied into ours (B made non-zero so
    the adapters change the output): loss, every LoRA gradient, and the merged model's logits agree."""
    from peft import get_peft_model

    model, ref, batch = pg2_pair
    ours = apply_preset(copy.deepcopy(model), "lora")
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(ref), lora_config())
    their_lora = {canonical_key(n.removeprefix("base_model.model.")): p
                  for n, p in theirs.named_parameters() if "lora_" in n}
    our_lora = {n.removeprefix("base_model.model."): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_lora) == set(their_lora) and len(our_lora) == 2 * 7 * model.config.text_config.num_hidden_layers
    with torch.no_grad():
        for n, p in their_lora.items():
            if "lora_B" in n:
                p.normal_(std=0.02)
            our_lora[n].copy_(p)
    loss = training_loss(ours, batch)
    ref_loss = reference_loss(theirs, batch)[0]
    assert abs(loss.item() / ref_loss.item() - 1) < LOSS_TOL
    loss.backward()
    ref_loss.backward()
    for n, p in our_lora.items():
        assert rel(p.grad, their_lora[n].grad) < GRAD_TOL, n
    with torch.no_grad():
        lora_logits = ours(**batch)["logits"]
        merged = merge_lora(ours)(**batch)["logits"]
    assert type(merged) is torch.Tensor and rel(merged, lora_logits) < 1e-12


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(pg2_pair):
    """--gradient_checkpointing trades memory for a second forward of each decoder layer in the backward pass; the
    gradients must not change."""
    model, _, batch = pg2_pair
    grads, calls = [], []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).requires_grad_(True)
        m.language_model.model.gradient_checkpointing = checkpointing
        seen = []
        # A pre-hook: the recomputation may stop early, once it has what the backward needs, before any post-hook.
        m.language_model.model.layers[0].register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        training_loss(m, batch).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        calls.append(len(seen))
    assert calls == [1, 2]  # really recomputed in the backward pass
    for name, g in grads[0].items():
        assert rel(grads[1][name], g) < 1e-12, name


def test_an_adapter_of_another_rank_is_a_clear_error(pg2_pair, tmp_path):
    """load_adapter into a model with another LoRA rank: TrainingError naming the fix, not torch's RuntimeError."""
    model = pg2_pair[0]
    save_adapter(apply_preset(copy.deepcopy(model), "lora", lora_rank=8), tmp_path, "base")
    with pytest.raises(TrainingError, match=r"the adapter does not fit this model \(size mismatch .*--lora_rank$"):
        load_adapter(apply_preset(copy.deepcopy(model), "lora", lora_rank=4), tmp_path)
