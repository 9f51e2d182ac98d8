#!/usr/bin/env bash
# Regenerate the README's figures from a real run of the embedded default (probes demo).
# Usage: bash docs/regenerate.sh [RUN_DIR]   (default runs/demo; the demo is run if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/demo}"
if [ ! -f "$run/results/results.parquet" ]; then
    probes demo --out "$run" --quiet
fi
probes figures "$run/results" --out docs/figures --format png
cp "$run/results/manifest.json" docs/figures/manifest.json
echo "docs/figures regenerated from $run"
