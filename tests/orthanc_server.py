"""A throw-away Orthanc PACS with its DICOMweb plugin, for tests: Debian's ``orthanc`` and
``orthanc-dicomweb`` (installed by scripts/setup_env.sh as root), started as a plain process
with a config in a temporary folder, never the Debian service.

Storage and index live in that folder; the DICOM port is off; HTTP answers local clients only
(``RemoteAccessAllowed`` false: Orthanc 1.10 has no HTTP bind address, it listens on every
interface and refuses requests from any other address than 127.0.0.1 with 401).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

INSTALL = "as root: apt-get install orthanc orthanc-dicomweb (scripts/setup_env.sh does it)"


def orthanc_program() -> str:
    program = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if program is None:
        raise RuntimeError(f"Orthanc is not installed; {INSTALL}")
    return program


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library, where Debian put it (``dpkg -L orthanc-dicomweb``)."""
    try:
        files = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"Orthanc's DICOMweb plugin is not installed; {INSTALL}") from exc
    libraries = sorted(Path(f) for f in files if "DicomWeb" in Path(f).name and ".so" in Path(f).name)
    if not libraries:
        raise RuntimeError(f"orthanc-dicomweb lists no DicomWeb shared library; {INSTALL}")
    return libraries[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """``Orthanc config.json`` on a free port; ``url`` is its REST API, ``dicomweb`` its DICOMweb root."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        (folder / "storage").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "medsaga-test-pacs",
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = open(folder / "orthanc.log", "w")
        self.log_path = folder / "orthanc.log"
        self.process = subprocess.Popen([orthanc_program(), str(folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=folder)

    def wait_until_up(self, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                system = self.get("/system")
                if "dicom-web" in self.get("/plugins"):
                    return system
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout} s")

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def upload(self, dicom_file: str | Path) -> dict:
        """``POST /instances`` of one DICOM file (Orthanc's REST API)."""
        request = urllib.request.Request(f"{self.url}/instances", data=Path(dicom_file).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def download(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=60) as response:
            return response.read()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.log.close()
        return self.process.returncode

