"""Many images into one JSON Lines file (`--output`), resumable, on one process or many launched by torchrun.

    python inference.py ... --image_list list.txt --output out.jsonl                    # one process
    torchrun --nproc_per_node 2 inference.py ... --image_list list.txt --output out.jsonl  # one rank per process

A record's identity is its index in the input list (with its path, so a list that names a file twice gets two
records). Each rank appends `INDEX<TAB>JSON-LINE` lines for its share to its own part file,
`out.jsonl.parts/rank-00003.jsonl`, flushed and fsynced per batch; when all are in, rank 0 writes the JSON lines
in input order to a temporary name, renames it to `out.jsonl` and deletes the parts. The ranks exchange one
message, at the start, through torchrun's key-value store (rank 0 repairs and reads the files, then sends the list
of images still to answer; no process group, no collective); the end needs none: rank 0 waits for the other
ranks' lines to reach the disk, so a rank that finishes early just exits. A rerun (or torchrun's restart) reads
the part files and the output, skips every image answered there, and drops a torn last line (killed mid-write),
whose image is then answered again. The settings that decide the answers are kept beside the output, in
`out.jsonl.run.json`, also after the merge: a rerun with other settings is refused before any line counts.

Checked by tests/test_batch_run.py: torchrun with 2 CPU ranks gives the single process's file byte for byte, a
rank SIGKILLed mid-write is recovered by torchrun's restart, an interrupted run resumes with its torn line redone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli_checks import OutputError, RunFailed, UsageError, log, one_line
from fileio import fsync_dir, try_lock
from ranks import STALL_S, Rank, share_plan  # noqa: F401 — Rank: part of this module's API

POLL_S = 0.2  # how often rank 0 looks at the other ranks' part files while it waits


def read_image_list(list_file: str, image_file_path) -> list[str]:
    """--image_list FILE -> its image paths in order: one per line, relative to the list's directory (absolute
    ones kept), blank lines skipped. No file is opened here: an unreadable image gets its error line later."""
    if image_file_path not in (None, ""):
        raise UsageError("give --image_file_path or --image_list, not both")
    p = Path(str(list_file))
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not in the first path
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--image_list {p} cannot be read ({type(e).__name__}); give a UTF-8 text file with one "
                         "image path per line") from None
    paths = [os.path.join(p.parent, line) for line in text.splitlines() if line.strip()]
    if not paths:
        raise UsageError(f"--image_list {p} names no images; give one image path per line")
    return paths


def path_text(path: str | os.PathLike) -> str:
    """A path as the "path" of a JSON record: valid UTF-8 text. A file name that is not UTF-8 reaches Python with
    lone surrogates ('\udce9' for byte 0xE9), which no UTF-8 writer takes; such bytes become the text "\\xe9"."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name gives (from Python, not the command line)
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Found:
    """Where each input index is already answered: source file (-1 none), byte offset and length of its JSON line,
    and whether it is an error record. files[0] is the output, files[1:] the part files."""

    files: list[Path]
    src: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    error: np.ndarray
    part_sizes: dict[Path, int]  # each part file's size after repair: where this run's lines start
    output_lines: int = 0

    @classmethod
    def empty(cls, n: int, output: Path) -> _Found:
        return cls([output], np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.zeros(n, bool), {})

    def add(self, index: int, file_id: int, offset: int, json_line: bytes, record: dict) -> None:
        if self.src[index] < 0:  # the first answer found wins (the output is read first)
            self.src[index], self.offset[index], self.length[index] = file_id, offset, len(json_line)
            self.error[index] = "error" in record


class Job:
    """One `--output` run of one rank: plan() (rank 0 decides who answers what), answer() (this rank's share into
    its part file), finish() (rank 0: wait for all, merge, summarise)."""

    def __init__(self, output: str, paths: Sequence[str], settings: dict, rank: Rank, image_list: str | None = None):
        self.output = check_output(output, paths, image_list)
        self.paths, self.settings, self.rank = list(paths), settings, rank
        self.parts = self.output.with_name(self.output.name + ".parts")
        self.manifest = self.output.with_name(self.output.name + ".run.json")  # the settings; kept after the merge
        self.part = self.parts / f"rank-{rank.rank:05d}.jsonl"
        self.shares: list[np.ndarray] = []
        self.part_sizes: dict[Path, int] = {}
        self.started = 0.0
        self.lock = -1  # rank 0: the descriptor holding OUT.lock (_lock), released when the run is done

    @property
    def share(self) -> list[int]:
        return self.shares[self.rank.rank].tolist() if self.shares else []

    def plan(self) -> list[int]:
        """Rank 0 checks the settings against OUT.run.json, repairs torn lines, finds what is answered and splits
        the rest into contiguous shares, one per rank; under torchrun it sends that to the other ranks, which wait
        for it (so no rank writes while rank 0 reads). Returns this rank's share: the input indices it must
        answer."""
        plan: object = None
        if self.rank.rank == 0:
            try:
                self._lock()
                found = self._scan(repair=True)
                pending = np.flatnonzero(found.src < 0).astype(np.int64)
                plan = (np.array_split(pending, self.rank.world), found.part_sizes)
            except ValueError as e:  # every rank exits with the same one-line error
                plan = e
        if self.rank.world > 1:
            plan = share_plan(plan, self.rank)
        if isinstance(plan, BaseException):
            raise plan
        self.shares, self.part_sizes = plan
        self.started = time.perf_counter()
        return self.share

    def _lock(self) -> None:
        """Rank 0 holds OUT.lock for the whole run: a second run on the same output (its settings check would pass
        while this one loads, both would append to one part file and each delete the other's parts) is refused.
        Under it, a killed run's temporary files (merge, settings) are removed: no run of OUT is writing them."""
        lock = try_lock(self.output.with_name(self.output.name + ".lock"))
        if lock is None:
            raise UsageError(f"another run is writing {self.output} (it holds {self.output.name}.lock); wait for it "
                             "to end, or give another --output")
        self.lock = lock
        for stale in (*self.output.parent.glob(f".{self.output.name}.tmp-*"),
                      *self.output.parent.glob(f".{self.manifest.name}.tmp-*")):
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Let the next run of OUT start (rank 0, done or failed; the process ending does it too). Idempotent."""
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1

    def answer(self, answer_lines: Callable[[list[int]], list[str]], batch_size: int) -> None:
        """This rank's share, batch_size images at a time: answer_lines(indices) gives their JSON lines, appended to
        the part file as INDEX<TAB>LINE and fsynced before the next batch, so a kill loses at most one batch."""
        share = self.share
        desc = f"rank {self.rank.rank}/{self.rank.world}" if self.rank.launched else "images"
        bar = tqdm(total=len(share), desc=desc, unit="image", file=sys.stderr)
        with open(self.part, "ab", buffering=0) as f, bar:
            for start in range(0, len(share), batch_size):
                indices = share[start:start + batch_size]
                lines = answer_lines(indices)
                data = "".join(f"{i}\t{line}\n" for i, line in zip(indices, lines, strict=True)).encode()
                try:
                    _append(f, data)
                except OSError as e:  # a full disk: the lines written so far stay, a torn last one is cut on rerun
                    raise _cannot_write(self.part, e) from None
                bar.update(len(indices))

    def finish(self) -> int:
        """Rank 0: wait until every rank's share is on disk, write the output in input order, delete the parts,
        print the summary on stdout. Returns how many records are errors (unreadable images), for the exit code;
        0 under torchrun, where a failing exit would make torchrun restart the group (a note says it instead)."""
        if self.rank.rank != 0:
            return 0
        self._wait_for_ranks()
        found = self._scan(repair=False)
        missing = np.flatnonzero(found.src < 0)
        if len(missing):
            raise RunFailed(f"{len(missing)} images (first: index {missing[0]}, {self.paths[missing[0]]}) have no "
                            f"line in {self.parts}; rerun the command to answer them")
        if len(self.paths) != found.output_lines or (found.src > 0).any():
            _merge(found, self.output)
        for part in self.parts.glob("*"):
            part.unlink()
        self.parts.rmdir()
        self.release()
        failed = int(found.error.sum())
        answered = sum(len(s) for s in self.shares)
        took = time.perf_counter() - self.started
        print(f"{path_text(self.output)}: {len(self.paths)} images, {answered} answered now in {took:.1f} s "
              f"({answered / took if took > 0 else 0:.2f} images/s with the model load, {self.rank.world} "
              f"process{'es' * (self.rank.world != 1)}), {len(self.paths) - answered} from before, {failed} unreadable",
              flush=True)
        if failed and self.rank.launched:
            log(f"note: {failed} images could not be read; their JSON lines in {self.output} say why")
            return 0
        return failed

    def _scan(self, repair: bool) -> _Found:
        """What is answered already: the output's line k counts for index k if it names paths[k]; a part file's
        line counts if complete. repair (rank 0, before anyone writes): the settings check (first: no line counts
        before it), and each part file cut back to its last complete line."""
        found = _Found.empty(len(self.paths), self.output)
        if repair:
            self._check_settings()
            self.parts.mkdir(exist_ok=True)
        if self.output.is_file():
            with open(self.output, "rb") as f:
                offset = 0
                for k, line in enumerate(f):
                    record = _record(line[:-1], self.paths, k) if line.endswith(b"\n") else None
                    if record is not None:
                        found.add(k, 0, offset, line[:-1], record)
                    offset += len(line)
                    found.output_lines = k + 1
        for part in sorted(self.parts.glob("rank-*.jsonl")) if self.parts.is_dir() else []:
            found.files.append(part)
            good = _read_part(part, self.paths, found, len(found.files) - 1)
            if repair and good < part.stat().st_size:
                with open(part, "r+b") as f:  # a torn last line: cut it off, so the rank appends after whole lines
                    f.truncate(good)
                    os.fsync(f.fileno())
                log(f"note: {part} ended in a torn line (killed mid-write); its image will be answered again")
            found.part_sizes[part] = good
        return found

    def _check_settings(self) -> None:
        """OUT.run.json holds the settings that decided the answers on disk (in the output or the parts); a rerun
        must match them. With no answer on disk, this run's settings are recorded there before its first answer."""
        holders = [p for p in (self.output, self.parts) if p.exists()]
        answered = [p for p in (self.output, *self.parts.glob("rank-*.jsonl")) if p.is_file() and p.stat().st_size]
        if not answered:
            _write_atomic(self.manifest, json.dumps(self.settings, sort_keys=True).encode())
            return
        answers = f"the answers in {_listed(holders)}"
        start_over = f"give another --output, or delete {_listed([*holders, self.manifest])} to start over"
        legacy = self.parts / "run.json"  # where versions before OUT.run.json kept them (without vae_path)
        source = legacy if not self.manifest.exists() and legacy.is_file() else self.manifest
        try:
            before = json.loads(source.read_bytes())
            if source is legacy and isinstance(before, dict):
                before.setdefault("vae_path", self.settings.get("vae_path"))  # not recorded then: cannot differ
                if os.path.isdir(str(before.get("model_path"))):  # recorded as typed then, resolved now
                    before["model_path"] = os.path.realpath(before["model_path"])
        except FileNotFoundError:
            raise UsageError(f"{answers} have no record of the settings they were made with ({self.manifest} is "
                             f"missing); {start_over}") from None
        except (OSError, ValueError) as e:
            before = one_line(e)
        if not isinstance(before, dict) or not before.keys() >= self.settings.keys():
            raise UsageError(f"{self.manifest}, the record of the settings of {answers}, is damaged (not a JSON "
                             f"object with every setting{f': {before}' if isinstance(before, str) else ''}); "
                             f"{start_over}")
        changed = sorted(k for k in before.keys() | self.settings.keys() if before.get(k) != self.settings.get(k))
        if changed:
            raise UsageError(f"{answers} were made with other settings ({', '.join(changed)}: "
                             f"{', '.join(repr(before.get(k)) for k in changed)}); rerun with those to finish or "
                             f"reuse them, {start_over}")
        if source is legacy:
            _write_atomic(self.manifest, json.dumps(self.settings, sort_keys=True).encode())

    def _wait_for_ranks(self) -> None:
        """Until each rank's part file holds its share: counts the new complete lines, reading only what was added
        since the last look. Raises when nothing grew for STALL_S (a rank died unseen)."""
        seen = {k: (self.part_sizes.get(self.parts / f"rank-{k:05d}.jsonl", 0), 0)
                for k in range(self.rank.world) if k != self.rank.rank}  # its own lines are on disk already
        last_growth = time.monotonic()
        while True:
            waiting = 0
            for k, (pos, lines) in seen.items():
                path = self.parts / f"rank-{k:05d}.jsonl"
                if lines < len(self.shares[k]) and path.exists():
                    with open(path, "rb") as f:
                        f.seek(pos)
                        new = f.read()
                    whole = new[:new.rfind(b"\n") + 1]
                    if whole:
                        seen[k], last_growth = (pos + len(whole), lines + whole.count(b"\n")), time.monotonic()
                waiting += seen[k][1] < len(self.shares[k])
            if not waiting:
                return
            if time.monotonic() - last_growth > STALL_S:
                raise RunFailed(f"{waiting} ranks wrote nothing to {self.parts} for {STALL_S} s; rerun the command "
                                "to resume (what is on disk is kept)")
            time.sleep(POLL_S)


def check_output(output: str, image_paths: Sequence[str], image_list: str | None = None) -> Path:
    """--output: a file name in an existing, writable directory, not an input image or the --image_list file, and
    if it exists a regular file: the merged output is renamed onto it, which would replace a device (/dev/null), a
    FIFO or a symlink by a plain file. Checked before the model loads."""
    out = Path(str(output))
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name such as {out / 'answers.jsonl'}")
    if not out.parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.parent} does not exist")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UsageError(f"--output {out} exists and is not a regular file (a symlink, device, FIFO or socket), which "
                         "the finished output would replace; give the path of a regular file")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--output {out} is not writable; check the directory's permissions")
    if os.path.abspath(out) in {os.path.abspath(p) for p in image_paths}:
        raise UsageError(f"--output {out} is one of the input images; give another path")
    if image_list is not None and out.exists() and os.path.samefile(out, str(image_list)):
        raise UsageError(f"--output {out} is the --image_list file; give another path")
    return out


def _record(json_line: bytes, paths: Sequence[str], index: int) -> dict | None:
    """The record a JSON line holds if it is the answer for input `index` (a dict naming paths[index]), else None."""
    try:
        record = json.loads(json_line)
    except ValueError:
        return None
    ok = index < len(paths) and isinstance(record, dict) and record.get("path") == path_text(paths[index])
    return record if ok else None


def _read_part(part: Path, paths: Sequence[str], found: _Found, file_id: int) -> int:
    """Adds a part file's complete lines to `found`; returns the byte length of its leading run of whole lines
    (what follows is torn). A whole line whose index or path is not this list's is kept but not counted."""
    offset = 0
    with open(part, "rb") as f:
        for line in f:
            index, tab, json_line = line.partition(b"\t")
            if not (line.endswith(b"\n") and tab and index.isdigit() and json_line.endswith(b"}\n")):
                break  # torn: cut off mid-line (a JSON object that ends before its closing brace)
            record = _record(json_line[:-1], paths, int(index))
            if record is not None:
                found.add(int(index), file_id, offset + len(index) + 1, json_line[:-1], record)
            offset += len(line)
    return offset


def _append(f, data: bytes) -> None:
    """One batch's lines to a part file (opened unbuffered: a write that fails on a full disk leaves nothing in a
    buffer for close() to fail on again), on disk before the next batch starts."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]
    os.fsync(f.fileno())


def _merge(found: _Found, output: Path) -> None:
    """The output in input order, each record's bytes copied from where it was found: written under a temporary
    name in the same directory, fsynced, renamed into place (a reader never sees half a file; on a full disk the
    old output and the parts stay as they were)."""
    tmp = output.with_name(f".{output.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    fds = [os.open(p, os.O_RDONLY) for p in found.files[:1] if p.is_file()] or [-1]
    fds += [os.open(p, os.O_RDONLY) for p in found.files[1:]]
    try:
        with open(tmp, "wb") as out:
            for src, offset, length in zip(found.src.tolist(), found.offset.tolist(), found.length.tolist(),
                                           strict=True):
                out.write(os.pread(fds[src], length, offset) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    except OSError as e:
        raise _cannot_write(output, e) from None
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        tmp.unlink(missing_ok=True)
    fsync_dir(output.parent)


def _write_atomic(path: Path, data: bytes) -> None:
    """A small file whole or not at all, on disk (with its name) before anything that relies on it is written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, e) from None


def _listed(paths: Sequence[Path]) -> str:
    """"a", "a and b", "a, b and c": the paths that exist."""
    names = [str(p) for p in paths if p.exists()]
    return ", ".join(names[:-1]) + " and " * (len(names) > 1) + names[-1]


def _cannot_write(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path} ({e.strerror or one_line(e)}); check the disk space and the directory")
