"""Fine-tuning parity with transformers (float64, PaliGemma 1 and 2 tiny hub-layout checkpoints, a batch of two
whose suffixes differ in length so one row is left-padded): the loss, every parameter's gradient, the weights
after one AdamW step; the prefix-LM mask's leak tests; the per-example loss; the presets; LoRA vs transformers +
peft with identical adapter weights.

transformers' own loss casts the logits to float32 (`logits.float()` in ForCausalLMLoss), even for a float64
model, so it agrees with ours only to float32 precision; the 1e-9 comparison and the gradients use its float64
logits with its own `fixed_cross_entropy` (the same function, without the cast) on the shifted labels.
"""

import copy

import pytest
import torch
from conftest import random_image
from reference import hf_model
from transformers.loss.loss_utils import fixed_cross_entropy

from generation import make_processor
from training import PRESETS, TrainingError, apply_preset, causal_lm_loss, lora_config, merge_lora
from utils import canonical_key, load_hf_model

LOSS_TOL, GRAD_TOL, WEIGHT_TOL = 1e-9, 1e-7, 1e-7
PROMPTS = ["caption en", "answer en what is on the beach?"]
SUFFIXES = ["a cow standing on the sand near the water at dusk", "two dogs"]


@pytest.fixture(scope="module", params=["pg1-legacy-mqa-224", "pg2-legacy-gqa-224"])
def pair(request, checkpoint):
    """(our float64 model, transformers' float64 model, a training batch) for one checkpoint."""
    path = checkpoint(request.param)
    model, tok = load_hf_model(path, "cpu", torch.float64, progress=False)
    batch = make_processor(model, tok)(text=PROMPTS, images=[random_image(1), random_image(2, (40, 90))],
                                       suffix=SUFFIXES)
    batch["pixel_values"] = batch["pixel_values"].double()
    assert not batch["attention_mask"].bool().all(), "the batch must hold a padded row"
    return model, hf_model(path).to(torch.float64), batch


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


def test_loss_and_every_gradient_match_transformers(pair):
    model, ref, batch = pair
    model, ref = copy.deepcopy(model).requires_grad_(True), copy.deepcopy(ref)
    loss = model(**batch)["loss"]
    ref_loss, hf_own_loss = reference_loss(ref, batch)
    assert loss.dtype == torch.float64
    print(f"loss {loss.item():.15f} vs {ref_loss.item():.15f}: rel {abs(loss.item() / ref_loss.item() - 1):.1e}")
    assert abs(loss.item() / ref_loss.item() - 1) < LOSS_TOL
    assert abs(loss.item() / hf_own_loss.item() - 1) < 1e-6  # transformers' loss is float32 (see the docstring)
    loss.backward()
    ref_loss.backward()
    worst = 0.0
    for name, ours, theirs in matched_parameters(model, ref):
        assert theirs.grad is not None and theirs.grad.abs().max() > 0, name
        err = rel(ours.grad, theirs.grad)
        worst = max(worst, err)
        assert err < GRAD_TOL, f"{name}: gradient rel err {err:.1e}"
    print(f"worst gradient rel err {worst:.1e}")


def test_one_adamw_step_keeps_weights_equal(pair):
    model, ref, batch = pair
    model, ref = copy.deepcopy(model).requires_grad_(True), copy.deepcopy(ref)
    pairs = matched_parameters(model, ref)
    before = {n: p.detach().clone() for n, p, _ in pairs}
    opts = [torch.optim.AdamW([p for _, p, _ in pairs], lr=1e-2, weight_decay=0.01),
            torch.optim.AdamW([t for _, _, t in pairs], lr=1e-2, weight_decay=0.01)]
    model(**batch)["loss"].backward()
    reference_loss(ref, batch)[0].backward()
    for opt in opts:
        opt.step()
    for name, ours, theirs in pairs:
        assert rel(ours.detach(), theirs.detach()) < WEIGHT_TOL, name
    moved = max(rel(p.detach(), before[n]) for n, p, _ in pairs)
    assert moved > 1e3 * WEIGHT_TOL  # the step changed the weights, far beyond the tolerance


def _suffix_logits(model, batch, row: int, position: int, token: int) -> torch.Tensor:
    ids = batch["input_ids"].clone()
    ids[row, position] = token
    with torch.no_grad():
        return model(ids, batch["pixel_values"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])[
            "logits"][row]


def test_no_leak_from_later_suffix_tokens(pair):
    """Changing suffix token t+1 changes no logit at positions <= t; changing the whole suffix no prefix logit;
    while changing the last prompt token does change the first image position's logits (bidirectional)."""
    model, _, batch = pair
    row = 0  # the unpadded row: its suffix is the longer one
    suffix = batch["token_type_ids"][row].nonzero()[:, 0]
    base = _suffix_logits(model, batch, row, 0, int(batch["input_ids"][row, 0]))
    for t in suffix[:-1].tolist():
        changed = _suffix_logits(model, batch, row, t + 1, 5)
        assert torch.equal(changed[:t + 1], base[:t + 1]), f"suffix token {t + 1} leaked into position <= {t}"
        assert not torch.equal(changed[t + 1:], base[t + 1:])
    ids = batch["input_ids"].clone()
    ids[row, suffix] = 7
    with torch.no_grad():
        other = model(ids, batch["pixel_values"], batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"])["logits"][row]
    first = int(suffix[0])
    assert torch.equal(other[:first], base[:first])
    prompt_end = first - 1  # the "\n" closing the prompt
    assert not torch.equal(_suffix_logits(model, batch, row, prompt_end - 1, 5)[0], base[0])


def test_without_token_type_ids_nothing_changes(pair):
    """An unpadded prompt with token_type_ids all 0 is the prefill's one bidirectional block, bit for bit."""
    model, _, batch = pair
    keep = batch["token_type_ids"][1] == 0
    keep &= batch["attention_mask"][1].bool()
    ids = batch["input_ids"][1, keep][None]
    with torch.no_grad():
        plain = model(ids, batch["pixel_values"][1:])["logits"]
        typed = model(ids, batch["pixel_values"][1:], token_type_ids=torch.zeros_like(ids))["logits"]
    assert torch.equal(plain, typed)


def test_per_example_loss_is_big_vision_s(pair):
    model, _, batch = pair
    with torch.no_grad():
        logits = model(**batch)["logits"]
    per_row = [causal_lm_loss(logits[b:b + 1], batch["labels"][b:b + 1]) for b in range(2)]
    example = causal_lm_loss(logits, batch["labels"], reduction="example")
    assert abs(example.item() / ((per_row[0] + per_row[1]) / 2).item() - 1) < 1e-12
    token = causal_lm_loss(logits, batch["labels"])
    n = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    assert n[0] != n[1] and abs(token.item() / ((per_row[0] * n[0] + per_row[1] * n[1]) / sum(n)).item() - 1) < 1e-12
    with pytest.raises(TrainingError, match="unknown loss reduction"):
        causal_lm_loss(logits, batch["labels"], reduction="sum")


@pytest.mark.parametrize("preset", PRESETS[:3])
def test_presets_train_what_they_say(pair, preset):
    model, _, _ = pair
    model = apply_preset(copy.deepcopy(model), preset)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    expected = {
        "full": names,
        "llm": {n for n in names if n.startswith("language_model.")},
        "attn": {n for n in names if n.startswith("language_model.model.layers.") and ".self_attn." in n},
    }[preset]
    assert trained == expected and trained


def test_unknown_preset_is_a_clear_error(pair):
    with pytest.raises(TrainingError, match="unknown preset 'bias'"):
        apply_preset(pair[0], "bias")


def test_lora_matches_transformers_with_peft(pair):
    """The same peft LoraConfig on both models, transformers' adapter weights copied into ours (B made non-zero so
    the adapters change the output): loss, every LoRA gradient, and the merged model's logits agree."""
    from peft import get_peft_model

    model, ref, batch = pair
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
    loss = ours(**batch)["loss"]
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
