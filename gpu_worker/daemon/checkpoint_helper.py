"""The worker's helper process for the driver's checkpoint API (native mode's warm tier).

The daemon forks executors, so it never initializes CUDA itself; this process does, once, and then
answers one line per request on stdin ("freeze PID" or "thaw PID") with one JSON line on stdout:
``{"result": CUresult}``. Freeze is lock (calls of the process wait) then checkpoint (its device
memory to host memory); thaw is restore then unlock. The daemon checks for room before a thaw.
"""
from __future__ import annotations

import json
import sys

LOCK_TIMEOUT_MS = 10_000  # a call running longer than this keeps the process from being frozen now


def _result(ret) -> int:
    err = ret[0] if isinstance(ret, tuple) else ret
    return int(err)


# the freeze's answer when the checkpoint failed and the process could not be unlocked either: it stays frozen,
# and the worker keeps its frozen byte set so that its next call asks for a thaw (CUDA_ERROR_ALREADY_ACQUIRED)
FROZEN_AS_IS = 210


def _state(d, pid: int) -> str:
    """The process's checkpoint state (RUNNING, LOCKED, CHECKPOINTED, FAILED), or "" when the driver cannot say."""
    err, state = d.cuCheckpointProcessGetState(pid)
    return state.name.removeprefix("CU_PROCESS_STATE_") if int(err) == 0 else ""


def main() -> int:
    from cuda.bindings import driver as d

    init = _result(d.cuInit(0))
    for line in sys.stdin:
        op, _, pid_text = line.strip().partition(" ")
        try:
            pid = int(pid_text)
        except ValueError:
            print(json.dumps({"result": 1}), flush=True)  # CUDA_ERROR_INVALID_VALUE
            continue
        if init:
            result = init
        elif op == "freeze":
            args = d.CUcheckpointLockArgs()
            args.timeoutMs = LOCK_TIMEOUT_MS
            result = _result(d.cuCheckpointProcessLock(pid, args))
            if result == 0:
                result = _result(d.cuCheckpointProcessCheckpoint(pid, None))
                if result != 0 and _state(d, pid) == "LOCKED":  # the process runs on, unfrozen, or stays frozen
                    unlocked = _result(d.cuCheckpointProcessUnlock(pid, None))
                    result = result if unlocked == 0 else FROZEN_AS_IS
        elif op == "thaw":
            # from wherever a failed step left it: checkpointed -> restore; locked -> unlock
            result = 0
            if _state(d, pid) == "CHECKPOINTED":
                result = _result(d.cuCheckpointProcessRestore(pid, None))
            if result == 0 and _state(d, pid) == "LOCKED":
                result = _result(d.cuCheckpointProcessUnlock(pid, None))
        else:
            result = 1
        print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
