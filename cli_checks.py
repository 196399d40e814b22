"""The command line's machinery: the flag table's type (`Flag`) and everything derived from a table of them
(argv parsing, the call into fire, the options dataclass and main()'s signature, value checks, --help), the
error types, and every failure as one "error:" line.

inference.py declares the flags (FLAGS) and runs them; this file knows no flag by name. The checks run before
the model loads, so a mistake costs a second, not a model load; `describe` turns any exception into an exit code
and one line (docs/errors.md). Image files in and out (reading, paths, drawings) are image_files.py's.
tests/test_errors_*.py, test_many.py and test_cli.py run every rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processing_paligemma import ProcessorError
from utils import CheckpointError


class ImageError(ValueError):
    """An image file that cannot be used as-is; the message names the file and what to do."""


class UsageError(ValueError):
    """A command-line flag that is missing, unknown or has a bad value."""


class RunFailed(RuntimeError):
    """A run that cannot finish for a reason outside this program (ranks that stopped writing, a lost host); not
    bad input and not a bug: exit 1 with the message as it is, which says what to do."""


class OutputError(ValueError):
    """An answer or a drawing that cannot be written (stdout closed, a full disk); the message says where."""


# ---------------------------------------------------------------------------------------------------------------
# the flag table and what is derived from it
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flag:
    """One command-line flag, declared once: its parsing, checks, --help entry and main() parameter follow from it.

    type: str (text, handed over verbatim: `--prompt 1e3` is "1e3"), list (one or more words, as the shell
    expands `imgs/*.jpg`; text too), int, float or bool (`--name` alone means True). required: what to give,
    for the "--name is required: ..." error (and the flag is marked required in --help). valid: (what the value
    must be, a test) for the "--name must be ..., got ..." error; the type is checked with it.
    """

    name: str
    type: type
    default: Any
    help: str
    short: str | None = None
    metavar: str | None = None
    required: str | None = None
    valid: tuple[str, Callable[[Any], bool]] | None = None
    shown_default: str | None = None  # the default as --help words it, when repr(default) would say too little

    @property
    def annotation(self) -> str:
        text = {list: "str | list[str]"}.get(self.type, self.type.__name__)
        return f"{text} | None" if self.default is None else text


def options_class(flags: Sequence[Flag], name: str = "Options") -> type:
    """A frozen dataclass with one field per flag (name, annotation, default), in table order."""
    fields = [(f.name, f.annotation, dataclasses.field(default=f.default)) for f in flags]
    return dataclasses.make_dataclass(name, fields, frozen=True)


def signature_of(flags: Sequence[Flag]) -> inspect.Signature:
    """main()'s signature: every flag a parameter, positional or keyword, in table order, with its default."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(f.name, kind, default=f.default, annotation=f.annotation)
                              for f in flags])


def args_doc(flags: Sequence[Flag]) -> str:
    """The "Args:" section of main()'s docstring, one entry per flag."""
    lines = ["", "    Args:"]
    for f in flags:
        lines += textwrap.wrap(f"{f.name}: {f.help}", 116, initial_indent=" " * 8, subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n"


def check_options(options: Any, flags: Sequence[Flag]) -> None:
    """Each value against its flag, in table order: required ones given, types and `valid` rules met.

    Python values, as fire parsed them (a bad word stays a string, so it is reported as given)."""
    for f in flags:
        value = getattr(options, f.name)
        if f.required is not None and (value is None or value == ""):
            raise UsageError(f"--{f.name} is required: {f.required}")
        if f.type is bool and not isinstance(value, bool):
            raise UsageError(f"--{f.name} must be True or False, got {value!r}")
        if f.type in (int, float) and not (value is None and f.default is None):
            numeric = isinstance(value, int if f.type is int else (int, float)) and not isinstance(value, bool)
            if not numeric or (f.valid is not None and not f.valid[1](value)):
                raise UsageError(f"--{f.name} must be {f.valid[0] if f.valid else f.type.__name__}, got {value!r}")


def parse_argv(argv: Sequence[str], flags: Sequence[Flag]) -> dict[str, str | list[str]] | None:
    """argv -> {flag name: its word(s), or the words "True"/"False"}, by the table; None when help was asked for.

    The rules: `--name value` and `--name=value` (`-` in a name reads as `_`), `-x value` / `-x=value` for a
    flag's short form; a bool flag alone, or before another option, means True, `--noname` means False; a list
    flag takes the words up to the next option; any other word (or all after `--`) fills the flags not given by
    name, in table order; the last of a repeated flag wins; `--help` / `-h` asks for help. Raises UsageError for
    an unknown flag (naming the closest one), a flag without its value, or a word no flag is left for.
    """
    by_name = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    given: dict[str, str | list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        tok, i = argv[i], i + 1
        if tok == "--":
            positional += argv[i:]
            break
        if tok in ("--help", "-h"):
            return None
        if not _is_option(tok):
            positional.append(tok)
            continue
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            name = name.replace("-", "_")
        elif tok[1] in by_short and tok[2:3] in ("", "="):
            name, eq, value = by_short[tok[1]].name, tok[2:3], tok[3:]
        else:
            raise UsageError(f"unknown option {tok}; flags are spelled --name (see --help)")
        negated = by_name.get(name[2:]) if name.startswith("no") and not eq else None
        if name not in by_name and negated is not None and negated.type is bool:
            given[negated.name] = "False"
            continue
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise UsageError(f"unknown flag --{name}; {hint}see --help for the flags")
        flag = by_name[name]
        if not eq:
            if flag.type is bool and (i == len(argv) or _is_option(argv[i])):
                given[name] = "True"
                continue
            if i == len(argv):
                raise UsageError(f"--{name} needs a value")
            value, i = argv[i], i + 1
        if flag.type is list:
            values = [value]
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            given[name] = values if len(values) > 1 else value
        else:
            given[name] = value
    free = [f.name for f in flags if f.name not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected argument {positional[len(free)]!r}; give options as --name value (see --help)")
    given.update(zip(free, positional, strict=False))
    return given


def fire_command(given: dict[str, str | list[str]], flags: Sequence[Flag]) -> list[str]:
    """parse_argv's result as the one form of fire's command line that needs none of its other rules:
    `--name=VALUE` per flag. Text flags (str, list) go as quoted Python literals, which fire hands over
    verbatim; the other values as written, for fire to parse as Python literals (2 -> 2, 0.5 -> 0.5, True ->
    True, and a word that is no literal stays a string, so the checks can report it as given)."""
    text = {f.name for f in flags if f.type in (str, list)}
    return [f"--{name}={value!r}" if name in text else f"--{name}={value}" for name, value in given.items()]


def help_text(flags: Sequence[Flag], prog: str, about: str, examples: Sequence[str], epilog: str) -> str:
    """--help: a usage line, `about`, every flag with its short form, default or "required", and help text, the
    examples, then `epilog`."""
    def spelled(f: Flag) -> str:
        metavar = f.metavar or {bool: "True|False", int: "N", float: "X", list: "PATH"}.get(f.type, "TEXT")
        return f"--{f.name}={metavar}" + (" ..." if f.type is list else "")

    required = [f for f in flags if f.required is not None]
    usage = " ".join(f"{spelled(f).replace('=', ' ', 1)}" for f in required)
    lines = [f"usage: python {prog} {usage} [FLAG ...]", "", about.strip(), "",
             "flags (a bool flag alone means True; positional words fill the flags in this order):"]
    for f in flags:
        names = (f"-{f.short}, " if f.short else "    ") + spelled(f)
        shown = f.shown_default or (f'"{f.default}"' if isinstance(f.default, str) else repr(f.default))
        note = "required" if f.required else f"default: {shown}"
        lines.append(f"  {names}  ({note})")
        lines += textwrap.wrap(f.help, 112, initial_indent=" " * 8, subsequent_indent=" " * 8)
    lines += ["", "examples:"] + [f"  {e}" for e in examples] + ["", epilog.strip()]
    return "\n".join(lines) + "\n"


def _is_option(tok: str) -> bool:
    """A word that names a flag, as opposed to a value: starts with "-", but not "-" alone or a number (-5)."""
    if not tok.startswith("-") or tok == "-":
        return False
    try:
        float(tok)
        return False
    except ValueError:
        return True


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    if sys.stderr is not None:  # started with stderr closed (2>&-): nothing can be said, the exit code still tells
        print(msg, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Exit codes: 2 bad input (flags, image, checkpoint), 1 out of memory or an unexpected error, 128 + N for a
# stop by signal N (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP), as a shell reports a process killed by it.
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 128 + signal.SIGINT
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or Ctrl-C), raised where the program is, so it unwinds as Ctrl-C does: temporary files
    removed, one line said. A KeyboardInterrupt, so code that lets Ctrl-C through lets these through too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise Stopped (the previous handlers come back after).
    Only the main thread may set handlers; elsewhere (a notebook's worker thread) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def describe(e: BaseException, stage: str, oom_hint: str | None = None) -> tuple[int, str]:
    """An exception -> (exit code, the one-line message after "error: "). oom_hint: what to do after running out
    of memory, for a program whose flags differ (default: inference.py's advice, naming its flags)."""
    if isinstance(e, KeyboardInterrupt):
        signum = getattr(e, "signum", signal.SIGINT)
        if signum == signal.SIGINT:
            return EXIT_INTERRUPTED, f"interrupted while {stage}"
        return 128 + signum, f"stopped by {signal.Signals(signum).name} while {stage}"
    oom = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
    if oom:
        detail = f" ({one_line(e)[:200]})" if str(e) else ""
        if oom_hint is not None:
            hint = oom_hint
        elif stage == "generating":
            hint = "lower --max_tokens_to_generate, use --dtype bfloat16, or use a device with more memory"
        else:
            hint = "try --dtype bfloat16 (half of float32), a smaller checkpoint, or a device with more memory"
        return EXIT_FAILURE, f"out of memory while {stage}{detail}; {hint}"
    if isinstance(e, RunFailed):
        return EXIT_FAILURE, one_line(e)
    if isinstance(e, (CheckpointError, ProcessorError, ImageError, UsageError, ValueError)):
        return EXIT_BAD_INPUT, one_line(e)
    if isinstance(e, OSError) and e.filename is not None:
        return EXIT_BAD_INPUT, f"{e.strerror or one_line(e)}: {e.filename}; check the path and its permissions"
    return EXIT_FAILURE, (f"unexpected {type(e).__name__} while {stage}: {one_line(e)[:300]}; "
                          "rerun with --debug for the traceback and report it")
