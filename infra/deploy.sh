#!/usr/bin/env sh
# Builds `handler` against glibc 2.28 (the Flex Consumption image runs an older glibc than a current
# desktop), packages it with `handler package`, and deploys the zip to the Function App.
# Run by `azd up` after provisioning (FUNCTION_APP_NAME and AZURE_RESOURCE_GROUP come from azd),
# or by hand with those two variables set.
set -eu
cd "$(dirname "$0")/.."
: "${FUNCTION_APP_NAME:?set FUNCTION_APP_NAME (an output of infra/main.bicep)}"
: "${AZURE_RESOURCE_GROUP:?set AZURE_RESOURCE_GROUP}"

command -v cargo-zigbuild >/dev/null || python3 -m pip install --quiet cargo-zigbuild ziglang
# Without debug info and symbols (the release profile keeps line tables: a 107 MB binary).
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo zigbuild --release --locked --target x86_64-unknown-linux-gnu.2.28
target/x86_64-unknown-linux-gnu/release/handler package --out target/app.zip
az functionapp deployment source config-zip \
    --resource-group "$AZURE_RESOURCE_GROUP" --name "$FUNCTION_APP_NAME" --src target/app.zip
