#!/usr/bin/env bash
# The test command: the offline Bicep checks (Python tools pinned in tests/infra/requirements.txt),
# DuckDB (tests/views/requirements.txt) to read Parquet back, then `cargo test` with Azurite (pinned in tests/azurite/package-lock.json) on a free loopback port
# for the Azure Blob tests, and Medplum (tests/medplum) for the third-party source tests. Installs
# what is missing; stops Azurite at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import pytest, tree_sitter_bicep, pycep, pyflakes' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check -r tests/infra/requirements.txt
python3 -m pytest tests/infra -q
python3 -c 'import duckdb' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check -r tests/views/requirements.txt

if [ ! -x tests/azurite/node_modules/.bin/azurite-blob ]; then
    npm ci --prefix tests/azurite --no-audit --no-fund --loglevel=error
fi
# Medplum's FHIR router (pinned in tests/medplum/package-lock.json), the third-party FHIR server of
# tests/third_party_source.rs; it needs Node.js 20.19 or later.
if [ ! -d tests/medplum/node_modules/@medplum/fhir-router ]; then
    npm ci --prefix tests/medplum --no-audit --no-fund --loglevel=error
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
data=$(mktemp -d)
tests/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
    --location "$data" --skipApiVersionCheck --silent >"$data/azurite.log" 2>&1 &
azurite=$!
# Tests that need a corpus from ../shared (absent from a fresh clone) say so here; CI skips none.
export FHIR_EXPORT_SKIPPED_LOG="$data/skipped.log"
# Results the tests report beside passing (the SQL on FHIR suite's counts).
export FHIR_EXPORT_SUMMARY_LOG="$data/summary.log"
report_skipped() {
    [ -s "$FHIR_EXPORT_SUMMARY_LOG" ] && sort -u "$FHIR_EXPORT_SUMMARY_LOG"
    if [ -s "$FHIR_EXPORT_SKIPPED_LOG" ]; then
        sort "$FHIR_EXPORT_SKIPPED_LOG"
        echo "$(wc -l <"$FHIR_EXPORT_SKIPPED_LOG") tests skipped: ../shared/data is not beside the project"
    fi
}
trap 'report_skipped; kill $azurite 2>/dev/null; wait $azurite 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 $azurite 2>/dev/null || { cat "$data/azurite.log"; exit 1; }
    sleep 0.1
done
export AZURITE_BLOB_PORT=$port

# The de-identification engine's R4 element table is generated from HL7's definitions (in Medplum's
# package): it must be what they give.
python3 tests/deid/make_r4_elements.py --check ||
    { echo "handler/fhirpath/r4_elements.tsv differs from the R4 definitions: run python3 tests/deid/make_r4_elements.py"; exit 1; }

cargo test --locked "$@"
