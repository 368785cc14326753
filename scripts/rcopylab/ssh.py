"""Root ssh from the host into a lab VM over its management port (qemu user-net hostfwd on 127.0.0.1).

An ssh login costs ~2 s of emulated crypto under TCG, so each VM gets one persistent master connection
(ControlMaster) that later commands multiplex over in ~0.1 s. Host keys are thrown away with the VM.
Commands run through rcopy.sys.run.run, except :meth:`Ssh.stream` (output must reach the terminal as it
comes) and the master (a daemon that must not hold our pipes): the two places Popen is needed.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import time
from pathlib import Path

from rcopylab.errors import GuestCommandFailed, LabError
from rcopy.sys.run import Result, run

MASTER_IDLE_S = 600


@dataclasses.dataclass(frozen=True)
class Ssh:
    host: str
    port: int
    key: Path
    control: Path

    def argv(self, cmd, *extra) -> list[str]:
        return [*self.opts(*extra), shell_text(cmd)]

    def opts(self, *extra) -> list[str]:
        # extra first: ssh keeps the first value it sees of each option
        return ["ssh", *extra, "-i", str(self.key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-o", f"ControlPath={self.control}", "root@127.0.0.1"]

    def run(self, cmd, *, input=None, timeout: float = 300.0, check: bool = True) -> Result:
        res = run(self.argv(cmd, "-o", "ControlMaster=no"), input=input, timeout=timeout)
        if check and res.rc != 0:
            last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise GuestCommandFailed(host=self.host, cmd=shell_text(cmd), rc=res.rc, last=last)
        return res

    def stream(self, cmd) -> int:
        """Run cmd with the caller's stdin/stdout/stderr; return its exit status."""
        return subprocess.run(self.argv(cmd, "-o", "ControlMaster=no")).returncode

    def start_master(self) -> None:
        self.stop_master()
        self.control.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(self.opts("-M", "-N", "-f", "-o", f"ControlPersist={MASTER_IDLE_S}"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        proc.wait(timeout=60)   # -f: returns once authenticated, leaving the master in the background

    def stop_master(self) -> None:
        if self.control.exists():
            run(self.opts("-O", "exit"), timeout=10)
            self.control.unlink(missing_ok=True)

    def wait_ready(self, deadline: float, alive) -> bool:
        """Poll until sshd answers (True), the VM dies or the deadline passes (False)."""
        while time.monotonic() < deadline:
            if not alive():
                return False
            if run(self.argv("true", "-o", "ControlMaster=no", "-o", "ConnectTimeout=3"), timeout=30).ok:
                self.start_master()
                return True
            time.sleep(1)
        return False


def shell_text(cmd) -> str:
    """A shell string as is; a list quoted word by word (what ssh hands to the remote shell)."""
    if isinstance(cmd, str):
        return cmd
    if not cmd:
        raise LabError("no command given")
    return shlex.join(str(c) for c in cmd)
