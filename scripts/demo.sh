#!/usr/bin/env bash
# Installs medsaga into .venv (if needed), then few-shot trains and evaluates the medsaga bundle
# on the embedded MNI152 demo data (prepared on first use). Extra arguments are bundle overrides,
# for example: bash scripts/demo.sh --shots 3 --epochs 20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m monai.bundle run training --config_file bundles/medsaga/configs/train.json "$@"
