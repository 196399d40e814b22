"""Who this process is in a torchrun job, and the one message the ranks of a many-image run exchange: rank 0's
plan, sent through torchrun's key-value store (no process group, no collective). Used by batch_run.py.

Checked by tests/test_batch_run.py (torchrun with 2 CPU ranks, a rank killed and restarted, 3 ranks on 2 images).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from cli_checks import RunFailed, UsageError

# Rank 0 gives up waiting when no part file has grown for this long (a rank or host was lost without torchrun
# noticing); the error exit makes torchrun restart the group, or the user reruns, and the work resumes.
STALL_S = 30 * 60


@dataclass(frozen=True)
class Rank:
    """Who this process is in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process
    started without torchrun is rank 0 of 1, not launched."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Rank:
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        world = int(env["WORLD_SIZE"])
        return cls(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)),
                   launched=True)

    def device(self, requested: str | None) -> str | None:
        """The device this rank runs on: under torchrun with CUDA, cuda:LOCAL_RANK (for no --device, `auto` or
        `cuda`); otherwise what was asked for. A fixed cuda:N would put every local rank on one GPU: refused."""
        if not self.launched:
            return requested
        if requested in (None, "auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        if requested is not None and str(requested).startswith("cuda:") and self.local_world > 1:
            raise UsageError(f"--device {requested} would put all {self.local_world} ranks of this host on one GPU; "
                             "give --device cuda (each rank takes cuda:LOCAL_RANK)")
        return requested

    def bind(self, device: torch.device) -> None:
        """Under torchrun: on the CPU, each of this host's ranks gets its part of the cores (torchrun itself sets
        OMP_NUM_THREADS=1); on CUDA, the rank's GPU becomes the current device, so anything that allocates on
        "the" GPU (CUDA graphs, caching allocator, kernels launched without a device) uses it, not cuda:0."""
        if not self.launched:
            return
        if device.type == "cpu":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // self.local_world))
        elif device.type == "cuda":
            torch.cuda.set_device(device)


def share_plan(plan: object, rank: Rank) -> object:
    """Rank 0's plan on every rank, through torchrun's key-value store (MASTER_ADDR:MASTER_PORT), no process group.

    torchrun keeps one store for all restarts of a job, so a key read by name may be a dead attempt's. Every key
    here is named by a nonce made fresh in this process: rank r posts its nonce under hello/r; rank 0 answers
    every nonce it sees there (stale ones too, harmlessly) with the nonce of its plan, until each rank has
    acknowledged that plan."""
    import pickle
    import uuid

    from torch.distributed import TCPStore

    host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank.rank == 0  # else torchrun's agent does
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=host,
                     timeout=timedelta(seconds=STALL_S), wait_for_workers=False, multi_tenant=True)
    mine = uuid.uuid4().hex
    if rank.rank != 0:
        store.set(f"batch_run/hello/{rank.rank}", mine)
        theirs = store.get(f"batch_run/reply/{mine}").decode()  # waits for rank 0
        plan = pickle.loads(store.get(f"batch_run/plan/{theirs}"))
        store.add(f"batch_run/acks/{theirs}", 1)
        return plan
    store.set(f"batch_run/plan/{mine}", pickle.dumps(plan))
    answered: set[bytes] = set()
    deadline = time.monotonic() + STALL_S
    while store.add(f"batch_run/acks/{mine}", 0) < rank.world - 1:
        for r in range(1, rank.world):
            if store.check([f"batch_run/hello/{r}"]):
                nonce = store.get(f"batch_run/hello/{r}")
                if nonce not in answered:
                    store.set(f"batch_run/reply/{nonce.decode()}", mine)
                    answered.add(nonce)
        if time.monotonic() > deadline:
            raise RunFailed(f"not every rank asked for the plan within {STALL_S} s; rerun the command")
        time.sleep(0.05)
    return plan
