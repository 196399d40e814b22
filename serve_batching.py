"""The server's model worker: one thread owns the model; requests that arrive while a batch runs form the next.

serve.py submits a `Job` per chat request; the worker takes up to max_batch_size waiting greedy jobs at once and
runs them as one left-padded batch through generation.generate_ids (as the CLI's --batch_size does), each row cut
at its own max_tokens or before its first stop string (StopStrings). A sampled job (temperature > 0) runs alone:
generate_ids draws every row from one seeded generator, so a sampled row in a batch would not get the answer its
seed gives it alone. Checked by tests/test_serve.py (concurrent clients get the answers they get alone).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
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
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)


@dataclass(eq=False)
class Job:
    """One request for the worker. on_piece (streaming) and done are called from the worker thread."""

    prompt: str
    image: Image.Image
    sampling: SamplingConfig
    done: Callable[[Result | BaseException], None]
    on_piece: Callable[[str], None] | None = None
    prompt_length: int = 0  # the prompt's tokens, image tokens included (the batch must fit the positions)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these to appear (OpenAI's `stop`)
    cancelled: bool = field(default=False)  # set by Batcher.cancel when the client went away


class StopStrings:
    """One answer's text, fed piece by piece (TextStream's pieces), cut before the first stop string to appear.

    push() returns only text that is final: a tail that could be the start of a stop string is held back until
    the next piece settles it, so a stream never shows text past the cut, even when a stop string is split over
    pieces. Streamed and unstreamed answers are cut by this one object, so they agree.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""  # the pieces so far (after a stop string: the text before it)
        self.sent = 0  # text[:sent] has been returned
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add one piece; returns the text that became final with it (often "")."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        # A stop string cannot start before `sent`: any tail that could have begun one was held back.
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            ready = len(self.text)
        else:
            tail = self.text[self.sent:]
            ready = self.sent + next((j for j in range(len(tail)) if any(s.startswith(tail[j:]) for s in self.stops)),
                                     len(tail))
        out, self.sent = self.text[self.sent:ready], ready
        return out

    def finish(self) -> str:
        """The held-back tail, once no more pieces come."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class _AllCancelled(Exception):
    """Every client of the running batch disconnected: stop decoding for nobody."""


class _AllFinished(Exception):
    """Every row of the running batch reached a stop string, EOS or its max_tokens (or lost its client)."""


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

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, so that /health and the max_queue check count
        only live requests; a job in the running batch is marked, and the batch stops once all of its are."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:  # Job compares by identity
                self._queue.remove(job)

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
        # The text is followed while decoding for rows that stream or have stop strings (each step then costs one
        # device sync, as streaming always did); a batch of neither only collects the ids.
        streams = [TextStream(tokenizer, self.eos) if job.on_piece or job.stop else None for job in batch]
        stoppers = [StopStrings(job.stop) if job.stop else None for job in batch]
        follow = any(stream is not None for stream in streams)
        stopped_at: list[int | None] = [None] * len(batch)  # tokens generated when the row's stop string showed
        finished = [False] * len(batch)
        steps: list[torch.Tensor] = []

        def send(i: int, piece: str) -> None:
            if batch[i].on_piece is not None and piece:
                batch[i].on_piece(piece)

        def emit(i: int, piece: str) -> None:  # a piece of the row's text: through its stop strings, if any
            send(i, piece if stoppers[i] is None else stoppers[i].push(piece))

        def on_token(tokens: torch.Tensor) -> None:
            if all(job.cancelled for job in batch):
                raise _AllCancelled
            step = len(steps)
            steps.append(tokens)
            # Rows are followed (one device sync a step) when one streams or has stop strings, or once a client
            # has left: the batch then ends as soon as every row is finished or abandoned, not at the longest
            # max_tokens of a client that is gone. A batch of neither only collects the ids.
            if not follow and not any(job.cancelled for job in batch):
                return
            for i, token in enumerate(tokens.tolist()):
                # A row past its own max_tokens is decoded only because a batch-mate asked for more: not its text.
                if finished[i]:
                    continue
                if streams[i] is not None:
                    emit(i, streams[i].push(token))
                    if stoppers[i] is not None and stoppers[i].stopped:
                        stopped_at[i] = step + 1
                finished[i] = stopped_at[i] is not None or token in self.eos or step + 1 >= limits[i]
            # A row cut at its stop string sends no EOS, and an abandoned one decodes for nobody: generate_ids would
            # go on to the longest max_tokens for them.
            if all(finished[i] or job.cancelled for i, job in enumerate(batch)):
                raise _AllFinished

        # Greedy rows share the settings but for max_tokens; a sampled job is alone in its batch.
        sampling = replace(batch[0].sampling, max_new_tokens=max(limits))
        try:
            generate_ids(self.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                         on_token=on_token, sampling=sampling)
        except _AllFinished:
            pass
        ids = torch.stack(steps, dim=1).cpu()  # the rows' ids, as generate_ids returns them
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        results = []
        for i in range(len(batch)):
            row = ids[i, :limits[i]].tolist()
            ended = next((n for n, t in enumerate(row) if t in self.eos), None)
            completion, reason = (len(row), "length") if ended is None else (ended + 1, "stop")
            if streams[i] is not None:
                emit(i, streams[i].finish())
            if stoppers[i] is not None:
                send(i, stoppers[i].finish())
            if stoppers[i] is not None and stoppers[i].stopped:
                text, completion, reason = stoppers[i].text, stopped_at[i] or completion, "stop"
            else:
                text = decode_text(tokenizer, ids[i, :limits[i]], self.eos)
            results.append(Result(text, int(prompt_lengths[i]), completion, reason))
        return results
