#!/usr/bin/env bash
# The small-scale BAM reproduction, every stage (docs/reproduction.md):
#   scripts/reproduce.sh                      # --scale small: a 1M-parameter seed, 3 mixing seeds, one GPU, 7 minutes
#   scripts/reproduce.sh --scale tiny --out /tmp/repro-tiny --seeds 1   # a CPU smoke run of every stage
# Needs python3 with torch (numpy), node >= 20 with this repo built (npm ci && npm run build), and the
# corpus (scripts/data/build_corpus.sh, docs/data.md). Extra arguments go to scripts/reproduce/pipeline.py
# (--out, --jobs, --gpus, --seeds, --bam, --bam-eval); its results are OUT/reproduction.json, which
# scripts/reproduce/report.py turns into docs/reproduction.md's tables and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -f dist/src/cli/main.js ]; then
  echo "reproduce.sh: the bam CLI is not built; run: npm ci && npm run build" >&2
  exit 1
fi
exec "$PYTHON" scripts/reproduce/pipeline.py "$@"
