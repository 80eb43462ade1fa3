"""`python -m pretrain` with faults injected, for tests/integration/test_faults.py.

The faults live here, in the test harness, not in the trainer: they patch the functions a real
fault would strike, then run the unmodified CLI. `FAULTS` (JSON, in the environment) picks them:

    {"torn_save": S}        checkpoint S's rank file is half written, then the process gets
                            SIGKILL: a machine lost in the middle of a save
    {"enospc_save": [S..]}  every file write of checkpoints S.. fails with ENOSPC (a full disk)
    {"slow_save": T}        every checkpoint file write first sleeps T seconds (a slow disk)
    {"nan_forward": [N..]}  the N-th training forward of this process (1-based) has a NaN loss
    {"unreadable_batch": N} reading the N-th training batch (1-based) fails with a SourceError
    {"unreadable_valid": N} the same for the N-th held-out batch
    {"signal_in_valid": [N, "SIGINT"]}  reading the N-th held-out batch, the process gets the
                            signal: Ctrl-C or a preemption in the middle of an evaluation
    {"rank": R, ...}        only rank R (its RANK variable) suffers the faults

Usage: FAULTS='{"torn_save": 4}' python tests/integration/faulty_run.py [overrides]
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torch

from pretrain.checkpoint import PARTIAL, tag_for
from pretrain.data.loader import Loader
from pretrain.data.sources import SourceError
from pretrain.models.rtd import RTDModel


def _in_checkpoint(path: object, steps: list[int]) -> bool:
    parts = Path(str(path)).parts
    return any(tag_for(step) + PARTIAL in parts for step in steps)


def install(faults: dict) -> None:
    real_save = torch.save

    if "torn_save" in faults:
        step = int(faults["torn_save"])

        def torn_save(obj, f, *args, **kwargs):
            if _in_checkpoint(f, [step]) and Path(str(f)).name.startswith("rank_"):
                Path(str(f)).write_bytes(b"\x80\x02half a pickle")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = torn_save

    if "enospc_save" in faults:
        steps = [int(s) for s in faults["enospc_save"]]

        def full_disk_save(obj, f, *args, **kwargs):
            if _in_checkpoint(f, steps):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk_save

    if "slow_save" in faults:
        delay = float(faults["slow_save"])
        inner_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            if PARTIAL in str(f):
                time.sleep(delay)
            return inner_save(obj, f, *args, **kwargs)

        torch.save = slow_save

    if "nan_forward" in faults:
        bad = {int(n) for n in faults["nan_forward"]}
        real_forward = RTDModel.forward
        calls = [0]

        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            if not self.training:
                return out
            calls[0] += 1
            return out._replace(loss=out.loss * float("nan")) if calls[0] in bad else out

        RTDModel.forward = forward  # type: ignore[method-assign]

    if "unreadable_batch" in faults or "unreadable_valid" in faults:
        bad = {False: faults.get("unreadable_batch"), True: faults.get("unreadable_valid")}
        read = {False: 0, True: 0}  # batches read so far, over every pass (evaluations restart)
        real_iter = Loader.__iter__

        def unreadable(self):
            held_out = self._plan.packing.remainder == "pad"  # how build_data makes that loader
            for batch in real_iter(self):
                read[held_out] += 1
                if read[held_out] == bad[held_out]:
                    raise SourceError("cannot read 'corrupt.txt': injected read error")
                yield batch

        Loader.__iter__ = unreadable  # type: ignore[method-assign]

    if "signal_in_valid" in faults:
        at, name = int(faults["signal_in_valid"][0]), faults["signal_in_valid"][1]
        held_out_read = [0]
        inner_iter = Loader.__iter__

        def signalled(self):
            for batch in inner_iter(self):
                if self._plan.packing.remainder == "pad":  # the held-out loader
                    held_out_read[0] += 1
                    if held_out_read[0] == at:
                        os.kill(os.getpid(), getattr(signal, name))
                yield batch

        Loader.__iter__ = signalled  # type: ignore[method-assign]


if __name__ == "__main__":
    faults = json.loads(os.environ.get("FAULTS", "{}"))
    if faults.get("rank") in (None, int(os.environ.get("RANK", "0"))):
        install(faults)
    sys.argv = ["pretrain", *sys.argv[1:]]
    runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
