#!/usr/bin/env bash
# Regenerate the README's figures from real runs of the embedded defaults.
# Usage: bash docs/regenerate.sh [RUN_DIR [SWEEP_DIR]]
#   RUN_DIR   a `probes demo` run (default runs/demo; the demo is run if it is missing, 8-12 min on 2 cores)
#   SWEEP_DIR a `probes sweep` run (default runs/sweep). Its results table is copied beside the
#             figures (docs/figures/sweep/results.parquet), so the sweep figures regenerate from the
#             committed table when no sweep run is at hand; SWEEP=1 runs the sweep (~56 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/demo}"
sweep="${2:-runs/sweep}"
if [ ! -f "$run/results/results.parquet" ]; then
    probes demo --out "$run" --quiet
fi
probes figures "$run/results" --out docs/figures --format png
cp "$run/results/manifest.json" docs/figures/manifest.json
if [ ! -f "$sweep/results.parquet" ] && [ "${SWEEP:-0}" = 1 ]; then
    probes sweep --out "$sweep" --quiet
fi
mkdir -p docs/figures/sweep
if [ -f "$sweep/results.parquet" ]; then
    cp "$sweep/results.parquet" "$sweep/manifest.json" docs/figures/sweep/
    for big in "$sweep"/results-eval*.parquet; do  # the large-eval measurements (the README's 1,000-problem ρ)
        [ -f "$big" ] && cp "$big" docs/figures/sweep/
    done
fi
probes figures docs/figures/sweep --out docs/figures/sweep --format png
echo "docs/figures regenerated from $run and $( [ -f "$sweep/results.parquet" ] && echo "$sweep" || echo "the committed sweep table")"
