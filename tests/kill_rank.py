"""A torchrun entry point for tests/test_batch_run.py: inference.cli(), except that on torchrun's first attempt
(TORCHELASTIC_RESTART_COUNT 0) rank KILL_RANK writes half of its KILL_AT-th batch to its part file, fsyncs it and
SIGKILLs itself, as a pre-empted or OOM-killed worker would be killed mid-write."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import batch_run  # noqa: E402
import inference  # noqa: E402

if os.environ.get("RANK") == os.environ["KILL_RANK"] and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    append, batches = batch_run._append, []

    def append_then_die(f, data: bytes) -> None:
        batches.append(len(data))
        if len(batches) == int(os.environ["KILL_AT"]):
            append(f, data[:len(data) // 2])  # a torn last line, on disk
            os.kill(os.getpid(), signal.SIGKILL)
        append(f, data)

    batch_run._append = append_then_die

if __name__ == "__main__":
    inference.cli()
