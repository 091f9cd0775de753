#!/usr/bin/env python3
"""Builds, packages and deploys the handler to the Function App azd just provisioned.

Run by `azd up` after provisioning (the postprovision hook), on macOS, Linux or Windows, with only
azd, Rust and Python 3.9+:

1. cross-compiles `handler` for the Flex Consumption image (Linux x86-64, glibc 2.28) with
   cargo-zigbuild, installed into a virtual environment under `target/` (never the system Python);
2. packages it with `handler package`, run from a build for this machine (the Linux binary may not
   run here);
3. uploads the zip to the app's deployment endpoint with a token from `azd auth token` (no Azure
   CLI), retrying while the app's new role assignments propagate.

The app and its host names come from the azd environment (`azd env get-values`), so the
subscription and environment are the ones azd chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "x86_64-unknown-linux-gnu"
ZIP = ROOT / "target" / "app.zip"
ATTEMPTS = 6


def run(*command: str, env: dict | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=env)


def azd_values() -> dict:
    """The azd environment's values (outputs of infra/main.bicep among them)."""
    text = subprocess.run(["azd", "env", "get-values", "--output", "json"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    return json.loads(text)


def zigbuild_environment() -> dict:
    """PATH with a virtual environment holding cargo-zigbuild and zig, made once under target/."""
    tools = ROOT / "target" / "deploy-tools"
    bin_dir = tools / ("Scripts" if os.name == "nt" else "bin")
    if not (bin_dir / ("cargo-zigbuild.exe" if os.name == "nt" else "cargo-zigbuild")).exists():
        venv.create(tools, with_pip=True)
        run(str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "cargo-zigbuild", "ziglang")
    env = dict(os.environ)
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    # Without debug info and symbols (the release profile keeps line tables: a 107 MB binary).
    env["CARGO_PROFILE_RELEASE_DEBUG"] = "0"
    env["CARGO_PROFILE_RELEASE_STRIP"] = "true"
    return env


def build_and_package() -> None:
    run("cargo", "zigbuild", "--release", "--locked", "--target", f"{TARGET}.2.28", env=zigbuild_environment())
    linux_binary = ROOT / "target" / TARGET / "release" / "handler"
    run("cargo", "run", "--release", "--locked", "--bin", "handler", "--",
        "package", "--binary", str(linux_binary), "--out", str(ZIP))


def token() -> str:
    text = subprocess.run(["azd", "auth", "token", "--output", "json",
                           "--scope", "https://management.azure.com//.default"],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(text)["token"]


def upload(scm_host: str) -> None:
    """One Deploy of the zip (the Flex Consumption deployment API); retried with backoff, since a
    role assignment made moments ago can take minutes to reach the app."""
    url = f"https://{scm_host}/api/publish?RemoteBuild=false"
    data = ZIP.read_bytes()
    for attempt in range(1, ATTEMPTS + 1):
        request = urllib.request.Request(url, data=data, method="POST", headers={
            "Authorization": f"Bearer {token()}",
            "Content-Type": "application/zip",
        })
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                print(f"deployed ({answer.status})", flush=True)
                return
        except (urllib.error.HTTPError, urllib.error.URLError) as error:
            if attempt == ATTEMPTS:
                raise SystemExit(f"deployment failed after {ATTEMPTS} attempts: {error}")
            pause = 15 * attempt
            print(f"attempt {attempt} failed ({error}); again in {pause} s", flush=True)
            time.sleep(pause)


def main() -> None:
    values = azd_values()
    scm_host = values.get("SCM_HOST_NAME")
    if not scm_host:
        raise SystemExit("SCM_HOST_NAME is not in the azd environment: run `azd provision` first")
    build_and_package()
    upload(scm_host)
    print(f"the API is at {values.get('APP_URL')}", flush=True)


if __name__ == "__main__":
    main()
