#!/usr/bin/env bash
# The test command: installs Azurite (pinned in tests/azurite/package-lock.json) when missing, starts
# it on a free loopback port for the Azure Blob tests, runs `cargo test`, and stops it again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x tests/azurite/node_modules/.bin/azurite-blob ]; then
    npm ci --prefix tests/azurite --no-audit --no-fund --loglevel=error
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
data=$(mktemp -d)
tests/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
    --location "$data" --skipApiVersionCheck --silent >"$data/azurite.log" 2>&1 &
azurite=$!
trap 'kill $azurite 2>/dev/null; wait $azurite 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 $azurite 2>/dev/null || { cat "$data/azurite.log"; exit 1; }
    sleep 0.1
done
export AZURITE_BLOB_PORT=$port

cargo test --locked "$@"
