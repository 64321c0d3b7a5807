"""How a run ends, told once and where it is read: the last line a user sees, and a status file for schedulers.

Under `accelerate launch` / `torchrun`, a rank that exits non-zero makes the launcher print a long
torch-elastic traceback per rank and return 1, whatever the rank's own code (2 user error, 3 NaN stop, 75
preempted). So:
- a failing rank does not print its error at once: the first failing rank of a launch hands the one-line error
  to a small reporter process that waits until the launcher has exited, then prints it, so it is the last
  line on the terminal (one line per launch, not one per rank). Without a launcher it is printed at once.
- rank 0 writes `<output_dir>/exit_status.json` ({"exit_code", "reason", "step", "time"}) whenever the run
  ends, so a job script can key its decisions (requeue on 75) on what the ranks wrote rather than on the
  launcher's 1 (slurm/launch.sh does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUS_FILE = "exit_status.json"
REPORTER_TIMEOUT_S = 120  # a launcher that outlives its failed ranks this long: print anyway

# The reporter: wait for the launcher (argv[1]) to exit, then print the message (argv[2]) on the inherited stderr.
_REPORTER = """
import os, sys, time
pid, message, lock, deadline = int(sys.argv[1]), sys.argv[2], sys.argv[3], time.time() + float(sys.argv[4])
def alive(p):  # a zombie (exited, not yet reaped by whoever started the launcher) counts as gone
    try:
        with open(f"/proc/{p}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while alive(pid) and time.time() < deadline:
    time.sleep(0.1)
print(message, file=sys.stderr, flush=True)
try:
    os.remove(lock)
except OSError:
    pass
"""


def write_status(output_dir: str | Path, exit_code: int, reason: str, step: int | None = None) -> None:
    """Rank 0: record how the run ended (atomically) next to its checkpoints."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    tmp = out / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"exit_code": exit_code, "reason": reason, "step": step, "time": time.time()}))
    os.replace(tmp, out / STATUS_FILE)


def under_launcher() -> bool:
    """True for a worker started by torchrun / accelerate launch (torch-elastic sets the run id; its parent is
    the launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def report_error(message: str) -> None:
    """Make `message` the last line the user sees (see the module docstring), once per launch."""
    if not under_launcher():
        print(message, file=sys.stderr, flush=True)
        return
    launcher = os.getppid()
    lock = Path(tempfile.gettempdir()) / f"distthink-final-word-{launcher}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another rank of this launch already reports
    os.close(fd)
    try:
        subprocess.Popen([sys.executable, "-c", _REPORTER, str(launcher), message, str(lock), str(REPORTER_TIMEOUT_S)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        print(message, file=sys.stderr, flush=True)
