"""--verbose: what one command-line run measures of itself (load time, time to first token, decode tokens/s, and
images/s for several images), reported on stderr as note: lines. The times are taken when tokens exist: each
step's tokens are read to the host (`tolist`), which waits for the device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from cli_checks import log


class RunStats:
    """--verbose: load time, time to first token, and decoding speed (tokens after each row's first, up to EOS)."""

    def __init__(self, load_s: float, eos_token_ids: Sequence[int]):
        self.load_s, self.eos = load_s, set(eos_token_ids)
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.tokens = self.images = self.batches = 0
        self.decode_s = 0.0

    def begin(self, rows: int) -> None:
        self.call_start, self.first_at, self.open_rows = time.perf_counter(), None, [True] * rows

    def on_token(self, token: torch.Tensor) -> None:
        step = token.tolist()  # waits for the device, so the times below are when tokens exist
        if self.first_at is None:
            self.first_at = time.perf_counter()
            if self.first_token_s is None:
                self.first_token_s = self.first_at - self.call_start
        else:
            self.tokens += sum(self.open_rows)
        self.open_rows = [open_ and t not in self.eos for open_, t in zip(self.open_rows, step, strict=True)]

    def end(self) -> None:
        if self.first_at is not None:
            self.decode_s += time.perf_counter() - self.first_at
        self.images += len(self.open_rows)
        self.batches += 1

    def report(self, many: bool) -> None:
        log(f"note: load {self.load_s:.2f} s")
        if self.first_token_s is not None:
            log(f"note: first token {self.first_token_s:.3f} s (vision tower + prompt prefill"
                f"{' of the first batch' if many else ''})")
        rate = self.tokens / self.decode_s if self.decode_s > 0 else 0.0
        log(f"note: {self.tokens} more tokens in {self.decode_s:.2f} s: {rate:.1f} tokens/s")
        if many:
            total = time.perf_counter() - self.started
            log(f"note: {self.images} images in {self.batches} batch{'es' * (self.batches != 1)}, {total:.2f} s: "
                f"{self.images / total:.2f} images/s")
