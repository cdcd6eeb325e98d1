"""Start and stop a real ``monailabel start_server`` with this app on 127.0.0.1 (tests, benchmark).
Standard library only, so that it runs from any environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

from client import LabelClient

APP_DIR = Path(__file__).resolve().parent
REPO = APP_DIR.parent


def monailabel_python(timeout: float = 3600) -> Path:
    """The interpreter of MONAI Label's environment, installed on first use by
    ``scripts/install_monailabel.sh`` (minutes the first time; a no-op afterwards)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "install_monailabel.sh")], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/install_monailabel.sh failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServer:
    """``python -m monailabel.main start_server`` with this app, bound to 127.0.0.1.

    Args:
        python: MONAI Label's interpreter (``monailabel_python()``).
        studies: the studies folder (or a DICOMweb URL); bundles: the bundles folder the app serves.
        conf: further ``--conf`` pairs (values that are not strings are sent as JSON).
        log: file for the server's output.
        env: further environment variables (MONAI Label's settings, e.g. ``MONAI_LABEL_DICOMWEB_CACHE_PATH``).
    """

    def __init__(self, python: str | Path, studies: str | Path, bundles: str | Path, log: str | Path,
                 conf: Mapping[str, Any] | None = None, threads: int = 1, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(python), "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies",
                   str(studies), "--host", "127.0.0.1", "--port", str(self.port), "--conf", "bundles", str(bundles)]
        for key, value in (conf or {}).items():
            command += ["--conf", key, value if isinstance(value, str) else json.dumps(value)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
               **(env or {})}
        self.log = open(log, "w")
        # Its own process group: stop() ends the server and the training processes it started.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.client = LabelClient(self.url)

    def wait_until_up(self, timeout: float = 300.0) -> dict:
        return self.client.wait_until_up(timeout, self.process)

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident memory so far (VmHWM, Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not in /proc/PID/status")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self.log.close()
        return self.process.returncode

    def __enter__(self) -> "LabelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
