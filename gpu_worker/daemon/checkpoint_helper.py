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
                if result != 0:  # the process runs on, unfrozen
                    d.cuCheckpointProcessUnlock(pid, None)
        elif op == "thaw":
            result = _result(d.cuCheckpointProcessRestore(pid, None))
            if result == 0:
                result = _result(d.cuCheckpointProcessUnlock(pid, None))
        else:
            result = 1
        print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
