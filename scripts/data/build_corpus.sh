#!/bin/sh
# Builds data/corpus (docs/data.md): downloads the Debian packages, extracts, splits, trains the
# tokenizer and writes the token files. Runs at low priority on one tokenizer thread.
#   scripts/data/build_corpus.sh [--refresh] [--verify] [other build_corpus.py options]
# PYTHON: a python3 with the `tokenizers` package (default: /tmp/venv/bin/python if present, else python3).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x /tmp/venv/bin/python ]; then PYTHON=/tmp/venv/bin/python; else PYTHON=python3; fi
fi
exec nice -n 10 "$PYTHON" "$here/build_corpus.py" "$@"
