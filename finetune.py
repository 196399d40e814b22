"""The fine-tuning command line: train a PaliGemma checkpoint on a JSON Lines dataset of (image, prefix, suffix).

    python finetune.py --model_path ckpt/ --data train.jsonl --output_dir runs/cows --preset lora --steps 200
    python finetune.py --model_path ckpt/ --data train.jsonl --output_dir runs/cows --resume    # after a stop

Each line of --data is {"image": "relative/to/the/file.jpg", "prefix": "caption en", "suffix": "a cow"}; bad lines
are reported with their numbers and skipped (--strict stops). AdamW, linear warm-up then cosine decay to 0,
gradient accumulation, bf16 autocast where the device computes bf16 natively, optional gradient checkpointing, a
held-out split evaluated every --eval_every steps. Every --save_every steps output_dir/checkpoint-NNNNNN holds the
model (hub layout: safetensors shards + index + config + tokenizer; LoRA: peft's adapter files) and
trainer_state.pt (step, the run's settings, optimizer state), written whole or not at all; --resume continues from
the last one, with the same settings only (a new run refuses a directory holding another run's checkpoints).
At the end: output_dir/final (and output_dir/merged with --preset lora --merge: adapters folded into the weights).
The flags are declared once, in FLAGS (machinery in cli_checks.py, as for inference.py).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import ops
from cli_checks import (
    EXIT_BAD_INPUT,
    Flag,
    UsageError,
    check_options,
    describe,
    fire_command,
    help_text,
    log,
    one_line,
    options_class,
    parse_argv,
    signature_of,
)
from finetune_data import batches_per_epoch, collate, micro_batch, read_dataset, split
from generation import make_processor
from hub_writer import atomic_directory, write_model
from quantize import is_int8_checkpoint
from training import PRESETS, apply_preset, load_adapter, loss_weight, merge_lora, save_adapter, training_loss
from utils import load_hf_model, resolve_device_dtype, resolve_model_path

CHECKPOINT = re.compile(r"checkpoint-(\d{6})$")
STATE_FILE = "trainer_state.pt"
# What a resumed run must share with the run that wrote the checkpoint: they decide the weights, the learning-rate
# schedule and the batch order. (--precision, --device, --eval_every, --save_every, --gradient_checkpointing may
# change between the two.) LoRA's rank and alpha only with --preset lora.
RUN_SETTINGS = ("model_path", "data", "preset", "batch_size", "grad_accum", "learning_rate", "warmup", "weight_decay",
                "max_grad_norm", "epochs", "steps", "loss_reduction", "eval_fraction", "seed")
LORA_SETTINGS = ("lora_rank", "lora_alpha")
# Out-of-memory hints in finetune.py's own flags (cli_checks.describe's default names inference.py's --dtype).
OOM_HINT_TRAINING = ("lower --batch_size (raise --grad_accum to keep the examples per step), add "
                     "--gradient_checkpointing, use --preset lora, or use a device with more memory")
OOM_HINT_LOADING = "fine-tuning holds the model in float32: use a smaller checkpoint or a device with more memory"


def _in(*choices: str) -> tuple[str, Any]:
    return ("one of " + ", ".join(choices), lambda v: v in choices)


def _at_least(low: float) -> tuple[str, Any]:
    return (f"a number >= {low}", lambda v: v >= low)


FLAGS: tuple[Flag, ...] = (
    Flag("model_path", str, None, "checkpoint to fine-tune, in the Hugging Face layout (or a hub id).",
         metavar="PATH", required="the checkpoint to fine-tune"),
    Flag("data", str, None, 'JSON Lines file, one {"image": path relative to the file, "prefix": prompt, "suffix": '
         "target} per line.", metavar="FILE", required="the training data (JSON Lines)"),
    Flag("output_dir", str, None, "where checkpoints go (created if absent).", metavar="DIR",
         required="a directory for the checkpoints"),
    Flag("preset", str, "lora", "what trains: full, llm (vision tower and projector frozen), attn (the decoder's "
         "attention weights only, as big_vision's notebook) or lora (peft, decoder q/k/v/o/gate/up/down).",
         valid=_in(*PRESETS)),
    Flag("batch_size", int, 4, "examples per micro-batch.", short="b", valid=("a positive integer", lambda v: v >= 1)),
    Flag("grad_accum", int, 1, "micro-batches per optimizer step.", valid=("a positive integer", lambda v: v >= 1)),
    Flag("learning_rate", float, 2e-5, "peak AdamW learning rate.", short="l", valid=("a number > 0", lambda v: v > 0)),
    Flag("warmup", float, 0.1, "fraction of the steps with a linear warm-up (then cosine decay to 0).",
         valid=("in [0, 1)", lambda v: 0 <= v < 1)),
    Flag("weight_decay", float, 0.0, "AdamW weight decay.", valid=_at_least(0)),
    Flag("max_grad_norm", float, 1.0, "clip the gradient norm to this (0 = no clipping).", valid=_at_least(0)),
    Flag("epochs", float, 1.0, "passes over the training split (used when --steps is 0).",
         valid=("a number > 0", lambda v: v > 0)),
    Flag("steps", int, 0, "optimizer steps (0: from --epochs).", valid=("an integer >= 0", lambda v: v >= 0)),
    Flag("loss_reduction", str, "token", "token: mean over all target tokens (transformers); example: per-example "
         "mean, then batch mean (big_vision).", valid=_in("token", "example")),
    Flag("precision", str, "auto", "auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, "
         "CPUs with AVX512-BF16/AMX), else float32; bf16; fp32.", valid=_in("auto", "bf16", "fp32")),
    Flag("gradient_checkpointing", bool, False, "recompute decoder activations in the backward pass (less memory)."),
    Flag("eval_fraction", float, 0.0, "fraction of the lines held out for evaluation.",
         valid=("in [0, 1)", lambda v: 0 <= v < 1)),
    Flag("eval_every", int, 50, "evaluate the held-out split every N steps (and at the end).",
         valid=("a positive integer", lambda v: v >= 1)),
    Flag("save_every", int, 100, "write a checkpoint every N steps.", valid=("a positive integer", lambda v: v >= 1)),
    Flag("resume", bool, False, "continue from the last checkpoint in --output_dir (model and optimizer state), "
         "with the flags of the run that wrote it."),
    Flag("merge", bool, False, "with --preset lora: also write output_dir/merged, the adapters folded into a full "
         "checkpoint."),
    Flag("lora_rank", int, 8, "LoRA rank r.", valid=("a positive integer", lambda v: v >= 1)),
    Flag("lora_alpha", int, 16, "LoRA alpha (the update is scaled by alpha / r).",
         valid=("a positive integer", lambda v: v >= 1)),
    Flag("strict", bool, False, "stop at the first bad data line instead of skipping it."),
    Flag("seed", int, 0, "seed of the shuffle and the held-out split.", valid=("an integer >= 0", lambda v: v >= 0)),
    Flag("device", str, None, "cpu, cuda, cuda:N or mps.", metavar="DEVICE",
         shown_default="CUDA, else MPS, else CPU"),
    Flag("debug", bool, False, "show Python tracebacks instead of one-line errors."),
)

Options = options_class(FLAGS)

ABOUT = """\
Fine-tune a PaliGemma checkpoint on (image, prefix, suffix) examples from a JSON Lines file; checkpoints in the
Hugging Face layout (LoRA: peft's adapter format) that this project and transformers both load."""

EXAMPLES = (
    "python finetune.py --model_path ckpt/ --data train.jsonl --output_dir runs/a --preset lora --steps 200",
    "python finetune.py --model_path ckpt/ --data train.jsonl --output_dir runs/a --preset attn -l 0.03 --epochs 3",
    "python finetune.py --model_path ckpt/ --data train.jsonl --output_dir runs/a --resume",
)

EPILOG = """\
exit codes: 0 done; 2 bad input (a flag, the data with --strict, the checkpoint); 1 out of memory or a bug;
130 interrupted (resume with --resume). Every error is one stderr line starting with "error:"."""


def lr_at(step: int, total: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to peak, then cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and ops.cpu_has_bf16_arithmetic()


def last_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if CHECKPOINT.search(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


def check_output_dir(options: Any) -> None:
    """Before the model loads: the --model_path must not be where --output_dir saves (final/, merged/ and
    checkpoint-* are replaced whole, and would take the input's weights with them; an --output_dir inside the
    checkpoint only adds directories to it), the directory is created and must be writable (not found out after
    the last step), and holds no other run's checkpoints unless --resume continues them. Raises UsageError."""
    out = Path(options.output_dir)
    model = Path(options.model_path)
    if model.exists():  # a hub id is read from the Hugging Face cache, never an output directory
        m, o = model.resolve(), out.resolve()  # symlinks followed: another spelling of the same directory
        target = m.relative_to(o).parts[0] if m.is_relative_to(o) and m != o else ""
        if target in ("final", "merged") or CHECKPOINT.fullmatch(target):
            raise UsageError(f"--output_dir {out} would replace {out / target}, which holds the checkpoint being "
                             f"fine-tuned (--model_path {model}); give another --output_dir, or copy the checkpoint "
                             "elsewhere")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; give a directory (it is created if absent)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=out))  # what saving does: a directory made in it
    except OSError as e:
        raise UsageError(f"--output_dir {out} cannot be written ({e.strerror or one_line(e)}); give a writable "
                         "directory") from None
    found = last_checkpoint(out)
    if found is not None and not options.resume:
        raise UsageError(f"--output_dir {out} already holds {found.name} of an earlier run; continue that run with "
                         "--resume, or give another --output_dir")


def run_settings(options: Any) -> dict[str, Any]:
    """The RUN_SETTINGS of this run as a checkpoint records them (local paths resolved: another spelling of the same
    file is the same setting)."""
    names = RUN_SETTINGS + (LORA_SETTINGS if options.preset == "lora" else ())
    settings = {name: getattr(options, name) for name in names}
    if options.steps:
        del settings["epochs"]  # not used then
    settings["data"] = str(Path(options.data).resolve())
    if Path(options.model_path).exists():
        settings["model_path"] = str(Path(options.model_path).resolve())
    return settings


def check_resume(state: dict[str, Any], settings: dict[str, Any], checkpoint: Path) -> None:
    """Raise UsageError naming every setting in which this run differs from the one that wrote `checkpoint`: a
    resume continues that run, it does not start another on its weights."""
    saved = state.get("settings", {"preset": state["preset"]})  # older checkpoints recorded only the preset
    differ = [f"--{k} {saved[k]} (now {settings[k]})" for k in settings if k in saved and saved[k] != settings[k]]
    if differ:
        raise UsageError(f"{checkpoint} was written by a run with other settings: {', '.join(differ)}; resume with "
                         "that run's flags, or start a new run in another --output_dir")


class Trainer:
    """One fine-tuning run: the model (preset applied), its optimizer, the data, and the step counter."""

    def __init__(self, options: Any):
        self.o = options
        self.out = Path(options.output_dir)
        self.device, _ = resolve_device_dtype(options.device, "float32")
        self.base_path = resolve_model_path(options.model_path)
        if self.base_path.is_dir() and is_int8_checkpoint(self.base_path):
            # Its int8 weights have no gradients (and peft cannot wrap its layers): refused, not a cryptic failure.
            raise UsageError(f"--model_path {options.model_path} is an int8 checkpoint (python quantize.py), which "
                             "cannot be fine-tuned; give the float checkpoint it was made from")
        self.resume_from = last_checkpoint(self.out) if options.resume else None
        if options.resume and self.resume_from is None:
            log(f"note: no checkpoint in {self.out} yet; starting from the beginning")
        self.settings = run_settings(options)
        state = None
        if self.resume_from is not None:
            state = torch.load(self.resume_from / STATE_FILE, map_location="cpu", weights_only=True)
            check_resume(state, self.settings, self.resume_from)  # before any weights load: LoRA rank included
            log(f"note: resuming from {self.resume_from} at step {state['step']}")
        # Full/llm/attn checkpoints hold the whole model; a LoRA checkpoint only its adapter over the base.
        load_from = self.resume_from if state is not None and options.preset != "lora" else self.base_path
        model, tokenizer = load_hf_model(load_from, self.device, torch.float32, progress=False)
        self.processor = make_processor(model, tokenizer)
        self.config = model.config
        model.language_model.model.gradient_checkpointing = options.gradient_checkpointing
        self.model = apply_preset(model, options.preset, options.lora_rank, options.lora_alpha)
        if state is not None and options.preset == "lora":
            load_adapter(self.model, self.resume_from)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, weight_decay=options.weight_decay)
        self.step = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
        self.bf16 = use_bf16(options.precision, self.device)

    def load_data(self) -> None:
        o = self.o
        max_positions = self.config.text_config.max_position_embeddings
        examples, skipped = read_dataset(o.data, self.processor, max_positions, o.strict,
                                         report=lambda m: log(f"note: {m}"))
        if skipped:
            log(f"note: skipped {skipped} bad line{'s' * (skipped != 1)} of {o.data}; --strict stops at the first")
        self.train, self.held_out = split(examples, o.eval_fraction, o.seed)
        per_step = o.batch_size * o.grad_accum
        self.total = o.steps or max(1, math.ceil(o.epochs * batches_per_epoch(len(self.train), o.batch_size)
                                                 / o.grad_accum))
        log(f"note: {len(self.train)} training examples, {len(self.held_out)} held out; {self.total} steps of "
            f"{per_step} examples; preset {o.preset}: {sum(p.numel() for p in self.params):,} trainable parameters; "
            f"{'bf16 autocast' if self.bf16 else 'float32'}")

    def loss(self, examples) -> tuple[torch.Tensor, int]:
        """(the micro-batch's loss, its weight in a mean over several: labelled tokens for --loss_reduction token,
        examples for example)."""
        batch = {k: v.to(self.device) for k, v in collate(examples, self.processor).items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = training_loss(self.model, batch, self.o.loss_reduction)
        return loss, loss_weight(batch["labels"], self.o.loss_reduction)

    def train_step(self) -> float:
        o = self.o
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total, round(o.warmup * self.total), o.learning_rate)
        # The step's loss is the mean over all its micro-batches' tokens (or examples), as one big batch's would be,
        # not the mean of the micro-batch means: each micro-batch's loss sum (mean x weight) is backpropagated and
        # the summed gradients are divided by the total weight, known only after the last micro-batch.
        total, weight = 0.0, 0
        for i in range(o.grad_accum):
            loss, n = self.loss(micro_batch(self.train, o.batch_size, o.seed, self.step * o.grad_accum + i))
            (loss * n).backward()
            total += loss.item() * n
            weight += n
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(weight)
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / weight

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        bs = self.o.batch_size
        losses = [self.loss(self.held_out[i:i + bs]) for i in range(0, len(self.held_out), bs)]
        return sum(loss.item() * n for loss, n in losses) / sum(n for _, n in losses)  # as train_step's mean

    def save(self, name: str, with_state: bool = True) -> Path:
        with atomic_directory(self.out / name) as tmp:
            if self.o.preset == "lora":
                save_adapter(self.model, tmp, str(self.o.model_path))
            else:
                write_model(self.model, self.base_path, tmp)
            if with_state:
                torch.save({"step": self.step, "preset": self.o.preset, "settings": self.settings,
                            "optimizer": self.optimizer.state_dict()}, tmp / STATE_FILE)
        return self.out / name

    def run(self) -> None:
        o = self.o
        recent: deque[float] = deque(maxlen=20)
        with tqdm(total=self.total, initial=self.step, desc="fine-tuning", unit="step", file=sys.stderr) as bar:
            while self.step < self.total:
                recent.append(self.train_step())
                bar.update(1)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}")  # running loss
                if self.held_out and (self.step % o.eval_every == 0 or self.step == self.total):
                    bar.write(f"step {self.step}: held-out loss {self.evaluate():.4f}", file=sys.stderr)
                if self.step % o.save_every == 0 and self.step < self.total:
                    bar.write(f"step {self.step}: saved {self.save(f'checkpoint-{self.step:06d}')}", file=sys.stderr)
        final = self.save("final", with_state=False)
        log(f"note: wrote {final}")
        if o.merge:
            merged = self.out / "merged"
            with atomic_directory(merged) as tmp:
                write_model(merge_lora(self.model), self.base_path, tmp)
            log(f"note: wrote {merged} (the adapters merged into a full checkpoint)")


def main(*args: Any, **flags: Any) -> None:
    """Fine-tune a PaliGemma checkpoint; called by fire with every flag by name (see FLAGS)."""
    options = Options(**signature_of(FLAGS).bind(*args, **flags).arguments)
    stage = "checking the flags"
    try:
        check_options(options, FLAGS)
        for f in FLAGS:  # check_options tests `valid` on numbers only; the choices here are text
            value = getattr(options, f.name)
            if f.type is str and f.valid is not None and not f.valid[1](value):
                raise UsageError(f"--{f.name} must be {f.valid[0]}, got {value!r}")
        if options.merge and options.preset != "lora":
            raise UsageError(f"--merge is for --preset lora; --preset {options.preset} already saves full weights")
        if not Path(options.data).is_file():
            raise UsageError(f"--data {options.data} is not a file; give a JSON Lines dataset")
        check_output_dir(options)
        stage = "loading the model"
        trainer = Trainer(options)
        stage = "reading the data"
        trainer.load_data()
        stage = "training"
        trainer.run()
    except BaseException as e:  # noqa: BLE001 — every failure becomes one line; --debug shows the traceback
        if options.debug is True or isinstance(e, SystemExit):
            raise
        code, message = describe(e, stage, oom_hint=OOM_HINT_TRAINING if stage == "training" else OOM_HINT_LOADING)
        if isinstance(e, KeyboardInterrupt):
            message += "; continue with --resume from the last checkpoint"
        log(f"error: {message}")
        sys.exit(code)


main.__signature__ = signature_of(FLAGS)


def cli(argv: list[str] | None = None) -> None:
    """argv -> FLAGS -> fire -> main, as inference.py's cli."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        given = parse_argv(argv, FLAGS)
    except UsageError as e:
        log(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    if given is None:
        sys.stdout.write(help_text(FLAGS, "finetune.py", ABOUT, EXAMPLES, EPILOG))
        return
    import fire

    fire.Fire(main, command=fire_command(given, FLAGS), name="finetune.py")


if __name__ == "__main__":
    cli()
