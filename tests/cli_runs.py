"""The error catalogue's command-line runs (tests/test_errors_*.py), started once per module.

A test reads one run of the CLI, named by its mark `@cli_run(kind, param)`: kind, and the value of the test's
parameter `param` (or ""). The test module's `cli_job(kind, case, ckpt, jpg, base)` says what that run is: (CLI
arguments, directories that must stay unchanged), its inputs built under `base`. conftest's `runs` and
`cli_result` fixtures hand each test (CompletedProcess, nothing written to those directories or the working
directory). Every kind runs the same cli() in this process, one at a time, without ~3 s of imports each, except
CLOSED_STDOUT: its stdout is a closed pipe, so it needs a process of its own and is started in the background as
soon as the module's first run is asked for (the subprocess path itself is tested in test_cli.py and
test_hostile_runtime.py). Only the runs of the selected tests (what -k, -m, node ids or --deselect leave) start.
"""

import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import cli_command, run_cli_here

CLOSED_STDOUT = "closed-stdout"  # the one kind that needs a process of its own

Job = Callable[[str, str, Path, Path, Path], tuple[list, list[Path]]]  # cli_job(kind, case, ckpt, jpg, base)


def cli_run(kind: str, param: str | None = None):
    """Marks a test that reads one CLI run, (kind, the value of its parameter `param`, or ""), through the
    `cli_result` fixture. Only the runs of the selected tests are started (see `module_runs`)."""
    return pytest.mark.cli_run(kind, param)


def snapshot(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of everything under path: equal before and after a run when it wrote nothing there."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _closed_stdout_run(args, cwd) -> subprocess.CompletedProcess:
    """Run the CLI with its stdout pipe already closed, as `inference.py ... | head -c0` does."""
    cmd = cli_command(*args)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    proc.stdout.close()
    err = proc.stderr.read()
    return subprocess.CompletedProcess(cmd, proc.wait(timeout=120), "", err)


def _job(args, watch, cwd, closed_stdout: bool):
    before = [snapshot(w) for w in watch]
    run = _closed_stdout_run(args, cwd) if closed_stdout else run_cli_here(*args, cwd=cwd)
    unchanged = [snapshot(w) for w in watch] == before and list(cwd.iterdir()) == []
    return run, unchanged


def run_key(item) -> tuple[str, str] | None:
    """(kind, case) of the CLI run a collected test reads (its cli_run mark), or None."""
    mark = item.get_closest_marker("cli_run")
    if mark is None:
        return None
    kind, param = mark.args
    return kind, (item.callspec.params[param] if param else "")


def _skipped_here(item) -> bool:
    """A skipif mark whose condition is already True (the no-CUDA test on a CUDA machine): no run to start."""
    return any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))


class Runs:
    """(kind, case) -> future of (CompletedProcess, checkpoint and working directory unchanged), on one pool."""

    def __init__(self, pool: ThreadPoolExecutor, job: Job, ckpt: Path, jpg: Path, base: Path):
        self.pool, self.job, self.ckpt, self.jpg, self.base = pool, job, ckpt, jpg, base
        self.futures: dict[tuple[str, str], Future] = {}

    def start(self, key: tuple[str, str]) -> Future:
        if key not in self.futures:
            args, watch = self.job(*key, self.ckpt, self.jpg, self.base)
            cwd = self.base / "cwd" / str(len(self.futures))
            cwd.mkdir(parents=True)
            if key[0] == CLOSED_STDOUT:
                self.futures[key] = self.pool.submit(_job, args, watch, cwd, True)
            else:  # in this process and thread (cli() sets signal handlers, which only the main thread may)
                self.futures[key] = Future()
                self.futures[key].set_result(_job(args, watch, cwd, False))
        return self.futures[key]


@contextmanager
def module_runs(request, ckpt: Path, jpg: Path, base: Path) -> Iterator[Runs]:
    """The CLI runs of the requesting module's selected tests (what -k, -m, node ids or --deselect leave in
    session.items), built by the module's cli_job, on a pool as wide as the machine: the CLOSED_STDOUT run starts
    at once in the background; the in-process runs, and any run no selected test asked for, start on first use."""
    selected = [run_key(item) for item in request.session.items
                if item.path == request.path and not _skipped_here(item)]
    wanted = dict.fromkeys(key for key in selected if key)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        started = Runs(pool, request.module.cli_job, ckpt, jpg, base)
        for key in wanted:
            if key[0] == CLOSED_STDOUT:
                started.start(key)
        yield started
