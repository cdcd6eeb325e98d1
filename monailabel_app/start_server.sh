#!/usr/bin/env bash
# Starts the medsaga MONAI Label app on 127.0.0.1 (HOST to change it, PORT default 8000).
#   bash monailabel_app/start_server.sh STUDIES_DIR [--conf KEY VALUE ...]
# Installs MONAI Label into its own environment first (scripts/install_monailabel.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
studies=${1:?usage: start_server.sh STUDIES_DIR [--conf KEY VALUE ...]}
shift
venv=$(bash scripts/install_monailabel.sh | tail -n 1)
# The module rather than the `monailabel` wrapper script: the wrapper runs whichever `python` is
# first on PATH and splits arguments with spaces (JSON values of --conf).
exec "$venv/bin/python" -m monailabel.main start_server --app "$PWD/monailabel_app" --studies "$studies" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
