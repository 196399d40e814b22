"""finetune.py end to end on a tiny checkpoint (in-process, as the command line runs it): checkpoints that our loader
and transformers load with the same logits, the LoRA adapter in peft's format loaded by transformers + peft and
--merge, resuming after an interruption ending where an uninterrupted run ends (and refused with other settings),
bad data lines reported with their numbers (--strict stops), output directories that would overwrite the input or
cannot be written refused before the model loads, and gradient accumulation giving one big batch's loss."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import random_image
from reference import hf_model, rel_err
from safetensors.torch import load_file

import finetune
import quantize
from generation import make_processor
from utils import load_hf_model

CKPT = "pg1-new-gqa-112"
SUFFIXES = ["a cat", "two dogs", "a red car", "blue sky", "a big tree", "an old house"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    lines = []
    for i, suffix in enumerate(SUFFIXES):
        random_image(i, (30 + i, 40)).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "prefix": "caption en", "suffix": suffix}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def run(capsys, *args) -> tuple[int, str]:
    """finetune.cli(ARGS) in this process -> (exit code, stderr)."""
    code = 0
    try:
        finetune.cli([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def train(capsys, checkpoint, dataset, out, *extra) -> tuple[int, str]:
    return run(capsys, "--model_path", checkpoint(CKPT), "--data", dataset, "--output_dir", out, "-b", 2,
               "--learning_rate", 1e-3, "--precision", "fp32", *extra)


def _inputs(model, tok):
    return make_processor(model, tok)(text=["caption en"], images=[random_image(9)])


def test_full_checkpoint_loads_here_and_in_transformers(capsys, checkpoint, dataset, tmp_path):
    code, err = train(capsys, checkpoint, dataset, tmp_path, "--preset", "llm", "--steps", 2, "--eval_fraction",
                      0.34, "--eval_every", 1)
    assert code == 0, err
    assert "step 1: held-out loss" in err and "2 held out" in err
    final = tmp_path / "final"
    assert (final / "model.safetensors.index.json").is_file() and (final / "tokenizer.json").is_file()
    ours, tok = load_hf_model(final, "cpu", progress=False)
    base, _ = load_hf_model(checkpoint(CKPT), "cpu", progress=False)
    inputs = _inputs(ours, tok)
    with torch.no_grad():
        logits = ours(inputs["input_ids"], inputs["pixel_values"])["logits"]
        theirs = hf_model(final)(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                 token_type_ids=torch.zeros_like(inputs["input_ids"])).logits
        before = base(inputs["input_ids"], inputs["pixel_values"])["logits"]
    assert rel_err(logits, theirs) < 1e-5
    assert rel_err(logits, before) > 1e-3  # it did train
    # llm preset: the vision tower is saved unchanged, the decoder changed.
    tower = "vision_tower.vision_model.post_layernorm.weight"
    assert torch.equal(ours.state_dict()[tower], base.state_dict()[tower])


def test_lora_adapter_loads_in_transformers_with_peft_and_merges(capsys, checkpoint, dataset, tmp_path):
    from peft import PeftModel

    code, err = train(capsys, checkpoint, dataset, tmp_path, "--preset", "lora", "--steps", 2, "--merge")
    assert code == 0, err
    adapter = tmp_path / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert any(k.startswith("base_model.model.model.language_model.layers.") for k in
               load_file(adapter / "adapter_model.safetensors"))
    merged, tok = load_hf_model(tmp_path / "merged", "cpu", progress=False)
    inputs = _inputs(merged, tok)
    with torch.no_grad():
        ours = merged(inputs["input_ids"], inputs["pixel_values"])["logits"]
        hf_in = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     token_type_ids=torch.zeros_like(inputs["input_ids"]))
        with_adapter = PeftModel.from_pretrained(hf_model(checkpoint(CKPT)), str(adapter))(**hf_in).logits
        merged_there = hf_model(tmp_path / "merged")(**hf_in).logits
        base = hf_model(checkpoint(CKPT))(**hf_in).logits
    assert rel_err(ours, with_adapter) < 1e-5 and rel_err(ours, merged_there) < 1e-5
    assert rel_err(ours, base) > 1e-4  # the adapter changed the model


def test_resume_after_interruption_ends_where_an_uninterrupted_run_does(capsys, checkpoint, dataset, tmp_path,
                                                                          monkeypatch):
    args = ("--preset", "attn", "--steps", 4, "--save_every", 2, "--grad_accum", 2)
    assert train(capsys, checkpoint, dataset, tmp_path / "straight", *args)[0] == 0
    step = finetune.Trainer.train_step

    def interrupted(self):
        if self.step == 3:  # steps 1..3 done, checkpoint-000002 written: step 3 is lost
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(finetune.Trainer, "train_step", interrupted)
    code, err = train(capsys, checkpoint, dataset, tmp_path / "cut", *args)
    assert code == 130 and "--resume" in err
    monkeypatch.setattr(finetune.Trainer, "train_step", step)
    code, err = train(capsys, checkpoint, dataset, tmp_path / "cut", *args, "--resume")
    assert code == 0, err
    assert f"resuming from {tmp_path / 'cut' / 'checkpoint-000002'} at step 2" in err
    a = load_file(tmp_path / "straight" / "final" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model-00001-of-00001.safetensors")
    changed = [k for k in a if ".self_attn." in k]
    assert changed and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lines_are_reported_by_number(capsys, checkpoint, dataset, tmp_path):
    lines = dataset.read_text().splitlines()
    lines[1:1] = ['{"image": "img/none.png", "suffix": "x"}', '{"image": "img/0.png", "suffix": "  "}', "{oops",
                  '{"image": "img/0.png", "prefix": 3, "suffix": "x"}', '{"image": "img/0.png", "suffix": "' +
                  "word " * 300 + '"}']
    bad = dataset.parent / "bad.jsonl"  # beside the images its paths are relative to
    bad.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, "--model_path", checkpoint(CKPT), "--data", bad, "--output_dir", tmp_path / "o",
                    "--strict")
    # Line 6 (300 words) is too long only for a 300-position model: read_dataset is asked with that limit below.
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {bad}:2: image ") and "--strict" in err
    from finetune_data import read_dataset

    model, tok = load_hf_model(checkpoint(CKPT), "cpu", progress=False)
    reports: list[str] = []
    examples, skipped = read_dataset(bad, make_processor(model, tok), 300, report=reports.append)
    assert skipped == 5 and len(examples) == len(SUFFIXES)
    assert [r.split(":")[1] for r in reports] == ["2", "3", "4", "5", "6"]
    assert "does not exist" in reports[0] and "suffix is empty" in reports[1] and "not valid JSON" in reports[2]
    assert '"prefix" must be a string' in reports[3] and "more than the model's 300 positions" in reports[4]


@pytest.mark.parametrize("args, message", [
    (["--preset", "bias"], "--preset must be one of full, llm, attn, lora, got 'bias'"),
    (["--merge", "--preset", "attn"], "--merge is for --preset lora"),
    (["--batch_size", 0], "--batch_size must be a positive integer"),
])
def test_bad_flags_are_one_line_errors(capsys, dataset, tmp_path, args, message):
    code, err = run(capsys, "--model_path", tmp_path, "--data", dataset, "--output_dir", tmp_path / "o", *args)
    assert code == 2 and err.strip() == f"error: {err.strip().removeprefix('error: ')}" and message in err


def test_jsonl_records_end_at_newline_only_and_a_bad_line_costs_only_itself(checkpoint, tmp_path):
    """U+2028 / U+0085 inside a string (json.dumps(ensure_ascii=False) leaves them) do not split a record; a leading
    BOM is dropped; a non-UTF-8 line, a prefix or suffix the processor refuses are reported lines, not a crash."""
    from finetune_data import read_dataset

    random_image(0).save(tmp_path / "0.png")

    def line(suffix, prefix="caption en", ascii=False):  # ascii: a lone surrogate as the escape \\ud800
        return json.dumps({"image": "0.png", "prefix": prefix, "suffix": suffix}, ensure_ascii=ascii).encode()
    data = tmp_path / "d.jsonl"
    latin1 = line("caf\u00e9").replace("\u00e9".encode(), b"\xe9")
    data.write_bytes(b"\xef\xbb\xbf" + b"\n".join([line("two dogs\u2028on a sofa"), line("blue\x85sky"), latin1,
                                                  line("a <image> car"), line("x", "a \ud800", ascii=True), line("ok")])
                     + b"\r\n")
    model, tok = load_hf_model(checkpoint(CKPT), "cpu", progress=False)
    reports: list[str] = []
    examples, skipped = read_dataset(data, make_processor(model, tok), 1000, report=reports.append)
    assert [(e.line, e.suffix) for e in examples] == [(1, "two dogs\u2028on a sofa"), (2, "blue\x85sky"), (6, "ok")]
    assert skipped == 3 and [r.split(":")[1] for r in reports] == ["3", "4", "5"]
    assert "not UTF-8 text (byte 0xe9" in reports[0] and "suffix contains the text <image>" in reports[1]
    assert "prefix holds bytes that are not valid UTF-8" in reports[2]


def _copy_checkpoint(checkpoint, where):
    shutil.copytree(checkpoint(CKPT), where)
    return where


@pytest.mark.parametrize("layout", ["final", "checkpoint", "symlink"])
def test_output_dir_that_would_overwrite_the_checkpoint_is_refused(capsys, checkpoint, dataset, tmp_path, layout):
    """final/, merged/ and checkpoint-* are replaced whole when saved: an input checkpoint there would be deleted.
    An --output_dir that is the checkpoint, or inside it, only adds directories to it: allowed."""
    out = tmp_path / "run"
    model = _copy_checkpoint(checkpoint, out / {"checkpoint": "checkpoint-000002"}.get(layout, "final"))
    given = model
    if layout == "symlink":
        given = tmp_path / "link"
        given.symlink_to(model)
    code, err = run(capsys, "--model_path", given, "--data", dataset, "--output_dir", out, "--resume")
    message = err.strip().removeprefix("error: ")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.startswith(f"--output_dir {out} would replace {model}, which holds the checkpoint"), message
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in checkpoint(CKPT).iterdir())
    for inside in (model, model / "runs"):
        finetune.check_output_dir(SimpleNamespace(output_dir=inside, model_path=given, resume=False))


def test_output_dir_is_checked_before_the_model_loads(capsys, checkpoint, dataset, tmp_path):
    (tmp_path / "afile").write_text("")
    for out, message in ((tmp_path / "afile", "is a file; give a directory (it is created if absent)"),
                         (tmp_path / "afile" / "x", "cannot be written (Not a directory); give a writable directory")):
        code, err = run(capsys, "--model_path", checkpoint(CKPT), "--data", dataset, "--output_dir", out)
        assert code == 2 and err.strip() == f"error: --output_dir {out} {message}", err


def test_resume_continues_only_the_same_run(capsys, checkpoint, dataset, tmp_path):
    """A checkpoint records the run's settings: a resume with other ones (LoRA rank and alpha included, checked
    before the adapter loads) is refused naming them, and a new run does not mix with an earlier run's checkpoints."""
    args = ("--preset", "lora", "--steps", 2, "--save_every", 1)
    assert train(capsys, checkpoint, dataset, tmp_path, *args)[0] == 0
    code, err = train(capsys, checkpoint, dataset, tmp_path, *args)
    assert code == 2 and "already holds checkpoint-000001 of an earlier run; continue that run with --resume" in err
    for extra, differ in ((["--lora_rank", 4], "--lora_rank 8 (now 4)"), (["--lora_alpha", 64], "--lora_alpha 16 (now "
                          "64)"), (["--learning_rate", 1e-4, "--seed", 3], "--learning_rate 0.001 (now 0.0001), "
                          "--seed 0 (now 3)")):
        code, err = train(capsys, checkpoint, dataset, tmp_path, *args, "--resume", *extra)
        assert code == 2 and err.strip() == (f"error: {tmp_path / 'checkpoint-000001'} was written by a run with other "
                                             f"settings: {differ}; resume with that run's flags, or start a new run in "
                                             "another --output_dir"), err


def test_gradient_accumulation_gives_the_token_mean_of_one_big_batch(checkpoint, tmp_path):
    """-b 2 and -b 1 --grad_accum 2 on the same two examples (targets of different lengths): the same loss and gradients
    (no clipping), not the mean of the two micro-batches' means."""
    random_image(0).save(tmp_path / "0.png")
    random_image(1).save(tmp_path / "1.png")
    suffixes = ["a cat", "a cow standing on the sand near the water at dusk"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "prefix": "caption en", "suffix": s})
                                              + "\n" for i, s in enumerate(suffixes)))
    results = []
    for b, accum in ((2, 1), (1, 2)):
        options = finetune.Options(**finetune.signature_of(finetune.FLAGS).bind(
            model_path=str(checkpoint(CKPT)), data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "o"),
            preset="attn", precision="fp32", steps=1, max_grad_norm=0.0, batch_size=b, grad_accum=accum).arguments)
        trainer = finetune.Trainer(options)
        trainer.load_data()
        trainer.optimizer.step = lambda: None  # keep the gradients to compare them
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        loss = trainer.train_step()
        results.append((loss, torch.cat([p.grad.flatten() for p in trainer.params])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert abs(loss_a / loss_b - 1) < 1e-6, (loss_a, loss_b)
    assert ((grad_a - grad_b).norm() / grad_a.norm()).item() < 1e-5


def test_out_of_memory_names_finetune_s_own_levers(capsys, checkpoint, dataset, tmp_path, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(finetune.Trainer, "train_step", oom)
    code, err = train(capsys, checkpoint, dataset, tmp_path, "--steps", 1)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: out of memory while training (CUDA out of memory. Tried to allocate")
    assert last.endswith("; " + finetune.OOM_HINT_TRAINING) and "--dtype" not in err


def test_bf16_autocast_trains(capsys, checkpoint, dataset, tmp_path):
    code, err = run(capsys, "--model_path", checkpoint(CKPT), "--data", dataset, "--output_dir", tmp_path, "-b", 2,
                    "--preset", "full", "--steps", 1, "--precision", "bf16")
    assert code == 0 and "bf16 autocast" in err, err


def test_an_int8_checkpoint_is_refused_before_training(capsys, checkpoint, dataset, tmp_path):
    """Its int8 weights have no gradients: one clear line, not an autograd or peft failure mid-run."""
    int8, _ = load_hf_model(checkpoint(CKPT), "cpu", quantize="int8", progress=False)
    q = quantize.save_int8_checkpoint(int8, checkpoint(CKPT), tmp_path / "int8")
    code, err = run(capsys, "--model_path", q, "--data", dataset, "--output_dir", tmp_path / "out", "--steps", 1)
    assert code == 2 and "is an int8 checkpoint (python quantize.py), which cannot be fine-tuned" in err, err
