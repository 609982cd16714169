"""One training job across several processes, started by ``accelerate launch``.

``accelerate launch --multi_gpu --num_processes 4 -m rlhf_cli.main train --project 1`` (or
with an ``accelerate config`` file for FSDP or DeepSpeed) starts the same CLI in every process.
Rank 0 alone touches the store and the registry: it claims the job, reads the annotations and
shares them, trains the reward model (small heads over a frozen encoder: one process is
enough), and gates, saves and records each candidate. The policy is what is worth spreading:
every rank runs the same TRL trainer, which picks up the process group that accelerate set up
and gives each rank its shard of the pairs.

A rank that fails makes its process exit non-zero, and accelerate's launcher then stops the
others; the job is left as the single-process path leaves it (failed and retried, or claimed
with a stale heartbeat, which the workers recover).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """The processes one job runs in: this one alone, or all those ``accelerate launch`` started."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, value: T) -> T:
        """Rank 0's ``value``, on every rank (the others pass anything, e.g. ``None``)."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def wait(self) -> None:
        """Return once every rank has got here."""
        self.share(None)

    def finish(self) -> None:
        """Wait for every rank, then leave the process group. A rank that exits while another
        still uses the group can be aborted on its way out (gloo: ``terminate called``)."""
        if self.count == 1:
            return
        self.wait()
        from accelerate import PartialState

        PartialState().destroy_process_group()


ONE_PROCESS = Ranks()


def launched() -> bool:
    """Whether this process is one of several that a launcher (accelerate, torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_launched_ranks() -> Ranks:
    """Join the process group the launcher describes: NCCL on GPUs, gloo on CPUs.

    Transformers' trainers reuse this state, so they train data-parallel with no more set-up.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes)
