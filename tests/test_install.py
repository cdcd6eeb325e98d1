"""The installed package: imports without torchvision/timm, and the console script works."""

import shutil
import subprocess
import sys


def test_import_does_not_pull_torchvision_or_timm():
    code = ("import sys, medsaga_components, medsaga_components.network, medsaga_components.cli; "
            "bad = [m for m in ('torchvision', 'timm') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_console_script_help():
    exe = shutil.which("medsaga") or str((__import__("pathlib").Path(sys.executable).parent / "medsaga"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, env={"PAGER": "cat", "PATH": ""})
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr  # fire prints help to stderr when not on a terminal
    assert "demo-data" in text and "fewshot" in text
