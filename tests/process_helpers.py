"""Starting train.py as one or several processes on 127.0.0.1, signalling them and always ending them: the
multi-process and preemption tests' launcher."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Process 1 of a multi-process run records every file it opens for writing outside the checkpoints folder
# (Python's audit hook sees each open), so a test can show that it wrote none of the run's files.
_RECORD_WRITES = """
import os, runpy, sys
log, workdir = sys.argv.pop(1), os.path.abspath(sys.argv.pop(1))
def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        path, mode, flags = os.path.abspath(os.fsdecode(args[0])), args[1] or "", args[2] or 0
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and path.startswith(workdir + os.sep) and not path.startswith(os.path.join(workdir, "checkpoints")):
            with open(log, "a") as f:
                f.write(path + "\\n")
sys.addaudithook(hook)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """train.py as `processes` processes of `devices // processes` CPU devices each, one command line, in this
    process's environment (so with its user cache folder, tests/conftest.py); each process's stdout and stderr
    go to files beside the work folder."""

    def __init__(self, argv: Sequence[str], workdir: Path, processes: int, devices: int,
                 record_writes: bool = False) -> None:
        self.workdir, self.processes = workdir, processes
        self.logs = workdir.parent / f"{workdir.name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
        self.popen: list[subprocess.Popen] = []
        for i in range(processes):
            launch = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                      "--process-id", str(i)] if processes > 1 else []
            program = ["train.py"]
            if record_writes and i == 1:
                program = ["-c", _RECORD_WRITES, str(self.writes_log(i)), str(workdir)]
            with open(self.logs / f"{i}.out", "w") as out, open(self.logs / f"{i}.err", "w") as err:
                self.popen.append(subprocess.Popen(  # each its own process group, as under a scheduler
                    [sys.executable, *program, *map(str, argv), "--workdir", str(workdir), *launch],
                    cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True))

    def writes_log(self, i: int) -> Path:
        return self.logs / f"{i}.writes"

    def out(self, i: int = 0) -> str:
        return (self.logs / f"{i}.out").read_text()

    def err(self, i: int = 0) -> str:
        return (self.logs / f"{i}.err").read_text()

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; kills them all if any is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.popen]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"train.py did not end within {timeout} s; stderr of process 0:\n"
                                 f"{self.err(0)[-3000:]}") from None

    def wait_for_checkpoint(self, step: int, timeout: float) -> None:
        """Until the checkpoint of `step` (or a later one) is complete; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.popen):
                raise AssertionError(f"train.py ended before checkpoint {step}:\n{self.err(0)[-3000:]}")
            folder = self.workdir / "checkpoints"
            steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
            if any(s >= step for s in steps):
                return
            time.sleep(0.05)
        raise AssertionError(f"no checkpoint of step {step} within {timeout} s")

    def signal(self, signum: int, i: int = 0) -> None:
        self.popen[i].send_signal(signum)

    def signal_group(self, signum: int, i: int = 0) -> None:
        """`signum` to every process of process i's group: it and its data workers (a terminal's Ctrl-C, or a
        scheduler's SIGTERM to a job's processes)."""
        os.killpg(self.popen[i].pid, signum)

    def kill(self) -> None:
        for p in self.popen:
            if p.poll() is None:
                p.kill()
                p.wait()


@contextlib.contextmanager
def running(*args, **kwargs) -> Iterator[Run]:
    """A Run whose processes are ended (killed if need be) when the block is left, however it is left."""
    run = Run(*args, **kwargs)
    try:
        yield run
    finally:
        run.kill()
