"""`python -m pretrain.torchrun [torchrun's arguments]`: torchrun (`torch.distributed.run`) that
ends in one line instead of its own traceback. launch/torchrun.sh runs it.

The workers say what went wrong themselves (an `error:` line, or `interrupted: saved`); torchrun
then raises in its own process, printing some forty lines of its internals. Here that becomes one
line naming the rank that stopped first or the signal that stopped the launch, and the exit code
that says the same: the rank's own code, or 128 + the signal (130 for Ctrl-C).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(None if argv is None else list(argv))
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: stopped by {name}, passed on to every worker (their lines above say "
              "whether they saved)", file=sys.stderr)  # fmt: skip
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            how, code = f"was killed by {failure.signal_name()}", 128 - failure.exitcode
        else:
            how, code = f"exited with code {failure.exitcode}", failure.exitcode
        print(f"torchrun: rank {rank} {how}, first; the other workers were stopped (the lines "
              "above say why)", file=sys.stderr)  # fmt: skip
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
