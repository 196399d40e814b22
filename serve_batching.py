"""The server's model worker: one thread owns the model; requests that arrive while a batch runs form the next.

serve.py submits a `Job` per chat request; the worker takes up to max_batch_size waiting greedy jobs at once and
runs them as one left-padded batch through generation.generate_ids (as the CLI's --batch_size does), each row cut
at its own max_tokens. A sampled job (temperature > 0) runs alone: generate_ids draws every row from one seeded
generator, so a sampled row in a batch would not get the answer its seed gives it alone. Checked by
tests/test_serve.py (concurrent clients get the answers they get alone).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from generation import SamplingConfig, TextStream, decode_text, generate_ids


@dataclass
class Result:
    """One finished answer: its text and the token counts for the response's `usage`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens reached)


@dataclass(eq=False)
class Job:
    """One request for the worker. on_piece (streaming) and done are called from the worker thread."""

    prompt: str
    image: Image.Image
    sampling: SamplingConfig
    done: Callable[[Result | BaseException], None]
    on_piece: Callable[[str], None] | None = None
    prompt_length: int = 0  # the prompt's tokens, image tokens included (the batch must fit the positions)
    cancelled: bool = field(default=False)  # set by the server when the client went away


class _AllCancelled(Exception):
    """Every client of the running batch disconnected: stop decoding for nobody."""


class Batcher:
    """Queue + worker thread. submit() returns False when max_queue jobs already wait (the server answers 429)."""

    def __init__(self, model, processor, max_batch_size: int, max_queue: int):
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = list(model.config.eos_token_id)
        self.max_positions = model.config.text_config.max_position_embeddings
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run: list[int] = []  # sizes of the batches so far (tests and /health read them)
        self.abandoned = 0  # batches stopped early because every client of theirs went away
        self._thread = threading.Thread(target=self._loop, name="paligemma-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                return False
            self._queue.append(job)
            self._cond.notify()
            return True

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        """The next batch: the first waiting job, and after it, if it is greedy, the waiting greedy jobs up to
        max_batch_size (in arrival order). Cancelled jobs are dropped here. None once closed."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            if first.sampling.do_sample:
                return batch
            keep: collections.deque[Job] = collections.deque()
            while self._queue:
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                if len(batch) < self.max_batch_size and not job.sampling.do_sample and self._fits(batch + [job]):
                    batch.append(job)
                else:
                    keep.append(job)
            self._queue = keep
            return batch

    def _fits(self, batch: list[Job]) -> bool:
        """Whether the left-padded batch (longest prompt + largest max_tokens) fits the model's positions, so
        that a job that fits alone cannot make a batch-mate fail."""
        longest = max(job.prompt_length for job in batch)
        return longest + max(job.sampling.max_new_tokens for job in batch) <= self.max_positions

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batches_run.append(len(batch))
            try:
                results = self._run(batch)
            except _AllCancelled:
                self.abandoned += 1
                continue
            except Exception as e:  # noqa: BLE001 - the worker must outlive any request; the error goes to its clients
                for job in batch:
                    job.done(e)
                continue
            for job, result in zip(batch, results, strict=True):
                job.done(result)

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> list[Result]:
        tokenizer = self.processor.tokenizer
        limits = [job.sampling.max_new_tokens for job in batch]
        inputs = self.processor(text=[job.prompt for job in batch], images=[job.image for job in batch])
        streams = [TextStream(tokenizer, self.eos) for _ in batch]
        step = [0]

        def on_token(tokens: torch.Tensor) -> None:
            if all(job.cancelled for job in batch):
                raise _AllCancelled
            for i, job in enumerate(batch):
                # A row past its own max_tokens is decoded only because a batch-mate asked for more: not its text.
                if job.on_piece is not None and step[0] < limits[i] and (piece := streams[i].push(int(tokens[i]))):
                    job.on_piece(piece)
            step[0] += 1

        # Greedy rows share the settings but for max_tokens; a sampled job is alone in its batch.
        sampling = replace(batch[0].sampling, max_new_tokens=max(limits))
        ids = generate_ids(self.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                           on_token=on_token, sampling=sampling).cpu()
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        results = []
        for i, job in enumerate(batch):
            row = ids[i, :limits[i]].tolist()
            ended = next((n for n, t in enumerate(row) if t in self.eos), None)
            if job.on_piece is not None and (rest := streams[i].finish()):
                job.on_piece(rest)
            results.append(Result(decode_text(tokenizer, ids[i, :limits[i]], self.eos), int(prompt_lengths[i]),
                                  len(row) if ended is None else ended + 1, "length" if ended is None else "stop"))
        return results
