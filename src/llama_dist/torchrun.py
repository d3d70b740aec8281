"""torchrun that passes on the trainers' exit codes.

    python -m llama_dist.torchrun --standalone --nproc_per_node 2 launch/pretrain.py ...

torchrun exits 1 whenever a worker fails, whatever the worker's exit code, so a script could
not tell a run stopped on request (exit code 3: requeue or resume it) or a user's mistake (2)
from a crash. This takes torchrun's arguments and runs torchrun itself. When every worker that
failed by itself (not by a signal) exited with the same one of those codes
(`llama_dist.exit_codes`), it exits with that code; when torchrun itself got a signal (it
passes it on to the workers, which checkpoint and stop), with 128 + the signal. Anything else
fails exactly as torchrun does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from llama_dist.exit_codes import EXIT_STOPPED, EXIT_USER_ERROR

PASSED_ON = {
    EXIT_USER_ERROR: "a user's mistake, reported by the workers above",
    EXIT_STOPPED: "stopped before the last step, with a checkpoint; the same command resumes",
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        torchrun_main(list(argv) if argv is not None else None)
    except ChildFailedError as e:
        # Workers killed by a signal (a negative code) are, here, those torchrun itself
        # stopped once the first worker had exited: only the codes of the others count.
        codes = {f.exitcode for f in e.failures.values() if f.exitcode >= 0}
        if len(codes) != 1 or (code := codes.pop()) not in PASSED_ON:
            raise
        print(f"llama_dist.torchrun: exit code {code}: {PASSED_ON[code]}", file=sys.stderr)
        return code
    except SignalException as e:
        print(
            f"llama_dist.torchrun: got {e.sigval.name}; passed it on to the workers",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
