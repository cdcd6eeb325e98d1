"""A small MONAI Label client on the standard library (urllib), for the tests and the
benchmark: upload an image, run infer, save a label, start and watch training.

    client = LabelClient("http://127.0.0.1:8000")
    client.upload_image("case_0", "case_0.nii.gz")
    label_bytes, params = client.infer("medsaga", "case_0")
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any


class LabelServerError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status, self.body = status, body


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, payload) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + payload + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class LabelClient:
    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, query: dict | None = None, fields: dict | None = None,
                files: dict | None = None, body: Any = None) -> tuple[bytes, str]:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers, data = {}, None
        if fields is not None or files is not None:
            data, headers["Content-Type"] = _multipart(fields or {}, files or {})
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise LabelServerError(exc.code, exc.read().decode(errors="replace")) from None

    def json(self, method: str, path: str, **kwargs) -> Any:
        return json.loads(self.request(method, path, **kwargs)[0])

    def info(self) -> dict:
        return self.json("GET", "/info/")

    def upload_image(self, image_id: str, path: str | Path) -> dict:
        return self.json("PUT", "/datastore/image", query={"image": image_id},
                         fields={"params": "{}"}, files={"file": (Path(path).name, Path(path).read_bytes())})

    def save_label(self, image_id: str, path: str | Path, tag: str = "final") -> dict:
        return self.json("PUT", "/datastore/label", query={"image": image_id, "tag": tag},
                         fields={"params": "{}"}, files={"label": (Path(path).name, Path(path).read_bytes())})

    def infer(self, model: str, image_id: str, params: dict | None = None,
              label: str | Path | None = None) -> tuple[bytes, dict]:
        """``(label file bytes, result params)`` of ``POST /infer/<model>?image=<id>``; ``label``: a
        label file sent with the request (a user's labelled slices, for completion)."""
        files = {"label": (Path(label).name, Path(label).read_bytes())} if label is not None else None
        payload, content_type = self.request("POST", f"/infer/{model}", query={"image": image_id, "output": "all"},
                                             fields={"params": json.dumps(params or {})}, files=files)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + payload)
        label, result = None, {}
        for part in message.iter_parts():
            if part.get_filename():
                label = part.get_payload(decode=True)
            else:
                result = json.loads(part.get_payload(decode=True) or b"{}")
        if label is None:
            raise LabelServerError(200, f"no label file in the infer answer (content type {content_type})")
        return label, result

    def train(self, model: str, params: dict | None = None) -> dict:
        return self.json("POST", f"/train/{model}", body=params or {})

    def wait_for_training(self, timeout: float = 900.0, poll: float = 2.0) -> dict:
        """The last training task once it is no longer running (DONE, ERROR, STOPPED)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            task = self.json("GET", "/train/")
            if task.get("status") not in ("SUBMITTED", "RUNNING"):
                return task
            time.sleep(poll)
        raise TimeoutError(f"training still running after {timeout} s")

    def wait_until_up(self, timeout: float = 300.0, process=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before answering")
            try:
                return self.info()
            except (OSError, LabelServerError):
                time.sleep(1.0)
        raise TimeoutError(f"no answer from {self.url} within {timeout} s")
