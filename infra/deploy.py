#!/usr/bin/env python3
"""Builds, packages and deploys the handler to the Function App azd just provisioned, and checks
that it runs.

Run by `azd up` (hooks in azure.yaml), on macOS, Linux or Windows (x86-64 or ARM), with only azd,
Rust and Python 3.9+:

- `deploy.py register-providers` (preprovision): registers the resource providers the deployment
  uses through Azure Resource Manager, with azd's token, and waits until each is registered.
- `deploy.py [--package ZIP]` (postprovision):
  1. cross-compiles `handler` for the Flex Consumption image (Linux x86-64, glibc 2.28) with
     cargo-zigbuild and zig, installed into a virtual environment under `target/` (never the
     system Python), and writes the deployment zip itself (the binary executable, `host.json`,
     one folder per function), so no second, native build is needed; `--package` uploads a given
     zip instead;
  2. publishes the zip to the app's deployment endpoint (One Deploy, as azd and Core Tools do:
     `POST /api/publish` answers 202 with a deployment id) and polls `/api/deployments/{id}` until
     it succeeds; a refused upload or a failed deployment (typically the storage roles made
     moments ago not yet in force) is printed with its status text and log URL and posted again
     with backoff, for about 5 minutes;
  3. waits until the app answers `GET /metadata` with its CapabilityStatement.
  It ends with an error, never green, when any step does not succeed.

The app and its host names come from the azd environment (`azd env get-values`), so the
subscription and environment are the ones azd chose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
TARGET = "x86_64-unknown-linux-gnu"
ZIP = ROOT / "target" / "app.zip"
MANAGEMENT = os.environ.get("AZURE_RESOURCE_MANAGER_ENDPOINT", "https://management.azure.com").rstrip("/")
PROVIDERS = ("Microsoft.App", "Microsoft.Web", "Microsoft.HealthcareApis")

# How long a deployment is posted again while it fails, and how long the app may take to answer.
DEPLOY_WINDOW_SECS = 300
APP_WINDOW_SECS = 300
# Polls of one deployment: a second apart (the pace azd uses), for at most this long.
POLL_SECS = 1.0
DEPLOYMENT_TIMEOUT_SECS = 900
# One Deploy's statuses (azd's PublishStatus).
CANCELLED, FAILED, SUCCESS, CONFLICT, PARTIAL = -1, 3, 4, 5, 6
# Answers no retry mends: the package itself is refused.
FINAL_STATUSES = {400, 413, 415}


class DeployError(Exception):
    """A deployment attempt that did not succeed; `final` when posting again cannot help."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


def run(*command: str, env: Optional[dict] = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=env)


def azd_values() -> dict:
    """The azd environment's values (outputs of infra/main.bicep among them)."""
    text = subprocess.run(["azd", "env", "get-values", "--output", "json"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    return json.loads(text)


def azd_token() -> str:
    text = subprocess.run(["azd", "auth", "token", "--output", "json",
                           "--scope", f"{MANAGEMENT}//.default"],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(text)["token"]


# -------------------------------------------------------------------------------------------------
# Build and package


def deploy_tools() -> Path:
    """A virtual environment under target/ with cargo-zigbuild and zig (ziglang), made once; its
    interpreter."""
    tools = ROOT / "target" / "deploy-tools"
    scripts = tools / ("Scripts" if os.name == "nt" else "bin")
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    zigbuild = scripts / ("cargo-zigbuild.exe" if os.name == "nt" else "cargo-zigbuild")
    if not zigbuild.exists():
        try:
            venv.create(tools, with_pip=True, clear=True)
        except (subprocess.CalledProcessError, OSError) as error:
            raise SystemExit(
                f"could not make a Python virtual environment in {tools} ({error}). On Debian or "
                "Ubuntu install python3-venv (sudo apt install python3-venv) and run azd up again")
        run(str(python), "-m", "pip", "install", "--quiet", "cargo-zigbuild", "ziglang")
    return python


def build_environment(python: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(python.parent) + os.pathsep + env.get("PATH", "")
    # cargo-zigbuild runs zig as `python -m ziglang` with this interpreter (the venv's), also where
    # a Windows venv has no `zig` on PATH.
    env["CARGO_ZIGBUILD_PYTHON_PATH"] = str(python)
    # Without debug info and symbols (the release profile keeps line tables: a 107 MB binary).
    env["CARGO_PROFILE_RELEASE_DEBUG"] = "0"
    env["CARGO_PROFILE_RELEASE_STRIP"] = "true"
    return env


def add_rust_target() -> None:
    """The Linux target's standard library, which a macOS, Windows or ARM machine lacks."""
    if shutil.which("rustup") is None:
        print(f"rustup not found: make sure the Rust target {TARGET} is installed", flush=True)
        return
    run("rustup", "target", "add", TARGET)


def build() -> Path:
    print(f"building handler for {TARGET} (glibc 2.28) on {platform.system()} {platform.machine()}",
          flush=True)
    add_rust_target()
    env = build_environment(deploy_tools())
    run("cargo", "zigbuild", "--release", "--locked", "--bin", "handler", "--target", f"{TARGET}.2.28",
        env=env)
    return ROOT / "target" / TARGET / "release" / "handler"


def write_package(binary: Path, out: Path) -> list:
    """The deployment zip `handler package` writes: the binary (executable) and `host.json` at the
    root, and `{Function}/function.json` for each function folder; the entries' names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        def add(name: str, data: bytes, mode: int) -> None:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.create_system = 3  # Unix, so that the mode is read
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
            entries.append(name)

        add("handler", binary.read_bytes(), 0o755)
        add("host.json", (ROOT / "host.json").read_bytes(), 0o644)
        for function_json in sorted((ROOT / "functions").glob("*/function.json")):
            add(f"{function_json.parent.name}/function.json", function_json.read_bytes(), 0o644)
    return entries


# -------------------------------------------------------------------------------------------------
# Deploy and check


def request(method: str, url: str, token: str, data: Optional[bytes] = None,
            content_type: Optional[str] = None, timeout: float = 60) -> tuple:
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def publish(scm_url: str, package: bytes, token: str) -> str:
    """Posts the zip; the deployment id."""
    try:
        status, _, body = request("POST", f"{scm_url}/api/publish?RemoteBuild=false", token,
                                  data=package, content_type="application/zip", timeout=600)
    except (urllib.error.URLError, OSError) as error:
        raise DeployError(f"the deployment endpoint could not be reached: {error}")
    if status != 202:
        text = body.decode("utf-8", "replace")[:500]
        raise DeployError(f"the upload was answered {status}: {text}", final=status in FINAL_STATUSES)
    try:
        deployment_id = json.loads(body)
    except ValueError:
        deployment_id = None
    if not isinstance(deployment_id, str) or not deployment_id:
        raise DeployError(f"the upload was accepted without a deployment id: {body[:200]!r}")
    return deployment_id


def wait_for_deployment(scm_url: str, deployment_id: str, token: Callable[[], str],
                        sleep: Callable[[float], None] = time.sleep,
                        clock: Callable[[], float] = time.monotonic) -> dict:
    """Polls the deployment until it ends; its last status when it succeeded."""
    url = f"{scm_url}/api/deployments/{deployment_id}"
    deadline = clock() + DEPLOYMENT_TIMEOUT_SECS
    not_found = 0
    last = None
    while True:
        try:
            status, headers, body = request("GET", url, token())
        except (urllib.error.URLError, OSError) as error:
            status, headers, body = None, {}, str(error).encode()
        if status == 404 and last is None and not_found < 3:
            # A deployment can take a moment to be listed.
            not_found += 1
        elif status == 404 and last is not None:
            # The deployment worker recycled after the deployment ended (as azd reads it).
            return last
        elif status in (200, 202):
            state = json.loads(body)
            code = state.get("status")
            where = f"status text: {state.get('status_text') or '-'}; log: {state.get('log_url') or '-'}"
            if code == SUCCESS:
                return state
            if code in (FAILED, PARTIAL):
                raise DeployError(f"deployment {deployment_id} failed ({where})")
            if code == CANCELLED:
                raise DeployError(f"deployment {deployment_id} was cancelled ({where})")
            if code == CONFLICT:
                raise DeployError(f"deployment {deployment_id} gave way to another deployment ({where})")
            last = state
            if state.get("progress"):
                print(f"  {state['progress']}", flush=True)
        else:
            raise DeployError(f"deployment {deployment_id}: its status was answered {status}: "
                              f"{body.decode('utf-8', 'replace')[:300]}")
        if clock() > deadline:
            raise DeployError(f"deployment {deployment_id} did not end within {DEPLOYMENT_TIMEOUT_SECS} s",
                              final=True)
        retry_after = headers.get("Retry-After") if headers else None
        sleep(float(retry_after) if retry_after and retry_after.isdigit() else POLL_SECS)


def deploy(scm_url: str, package: bytes, token: Callable[[], str],
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic,
           window: float = DEPLOY_WINDOW_SECS) -> dict:
    """Publishes the package until a deployment succeeds, posting again with backoff for `window`
    seconds while uploads are refused or deployments fail (roles still propagating)."""
    deadline = clock() + window
    pause = 10.0
    attempt = 0
    while True:
        attempt += 1
        try:
            deployment_id = publish(scm_url, package, token())
            print(f"deployment {deployment_id} started (attempt {attempt})", flush=True)
            state = wait_for_deployment(scm_url, deployment_id, token, sleep, clock)
            print(f"deployment {deployment_id} succeeded", flush=True)
            return state
        except DeployError as error:
            if error.final or clock() + pause > deadline:
                raise SystemExit(f"deploying failed after {attempt} attempts: {error}")
            print(f"attempt {attempt}: {error}; posting again in {pause:.0f} s", flush=True)
            sleep(pause)
            pause = min(pause * 2, 60.0)


def wait_for_app(app_url: str, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, window: float = APP_WINDOW_SECS) -> None:
    """Waits until the app answers `GET /metadata` with a CapabilityStatement."""
    deadline = clock() + window
    while True:
        try:
            req = urllib.request.Request(f"{app_url}/metadata", headers={"Accept": "application/fhir+json"})
            with urllib.request.urlopen(req, timeout=30) as answer:
                body = json.loads(answer.read())
                if body.get("resourceType") == "CapabilityStatement":
                    print(f"the app answers at {app_url}", flush=True)
                    return
                last = f"200 without a CapabilityStatement: {str(body)[:200]}"
        except urllib.error.HTTPError as error:
            last = f"{error.code}: {error.read().decode('utf-8', 'replace')[:300]}"
        except (urllib.error.URLError, OSError, ValueError) as error:
            last = str(error)
        if clock() > deadline:
            raise SystemExit(f"the app at {app_url} does not answer /metadata after {window:.0f} s "
                             f"(last: {last}); see its logs in Application Insights")
        print(f"waiting for the app ({last})", flush=True)
        sleep(10)


# -------------------------------------------------------------------------------------------------
# Resource providers


def register_providers(subscription: str, token: Callable[[], str],
                       sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic,
                       management: str = MANAGEMENT, window: float = 600) -> None:
    """Registers each provider not registered yet and waits until it is (idempotent)."""
    for namespace in PROVIDERS:
        url = f"{management}/subscriptions/{subscription}/providers/{namespace}"
        deadline = clock() + window
        asked = False
        while True:
            status, _, body = request("GET", f"{url}?api-version=2021-04-01", token())
            if status != 200:
                raise SystemExit(f"reading provider {namespace} was answered {status}: {body[:300]!r}")
            state = json.loads(body).get("registrationState")
            if state == "Registered":
                print(f"{namespace}: registered", flush=True)
                break
            if not asked and state != "Registering":
                status, _, body = request("POST", f"{url}/register?api-version=2021-04-01", token())
                if status != 200:
                    raise SystemExit(
                        f"registering {namespace} was answered {status}: {body[:300]!r} (it needs "
                        "the permission Microsoft.*/register/action, held by Contributor or Owner "
                        "of the subscription)")
                asked = True
            if clock() > deadline:
                raise SystemExit(f"{namespace} is still {state} after {window:.0f} s")
            print(f"{namespace}: {state}; waiting", flush=True)
            sleep(10)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", nargs="?", choices=["deploy", "register-providers"], default="deploy")
    parser.add_argument("--package", type=Path, help="upload this zip instead of building one")
    args = parser.parse_args(argv)
    values = azd_values()
    if args.step == "register-providers":
        subscription = values.get("AZURE_SUBSCRIPTION_ID") or os.environ.get("AZURE_SUBSCRIPTION_ID")
        if not subscription:
            raise SystemExit("AZURE_SUBSCRIPTION_ID is not in the azd environment")
        register_providers(subscription, azd_token)
        return
    scm_host = values.get("SCM_HOST_NAME")
    if not scm_host:
        raise SystemExit("SCM_HOST_NAME is not in the azd environment: run `azd provision` first")
    package = args.package
    if package is None:
        package = ZIP
        entries = write_package(build(), package)
        print(f"packaged {len(entries)} entries into {package}", flush=True)
    elif not package.is_file():
        raise SystemExit(f"--package {package}: no such file")
    deploy(f"https://{scm_host}", package.read_bytes(), azd_token)
    wait_for_app(values.get("APP_URL") or f"https://{scm_host.replace('.scm.', '.', 1)}")


if __name__ == "__main__":
    main(sys.argv[1:])
