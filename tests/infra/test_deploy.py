"""infra/deploy.py against loopback stand-ins: a Flex Consumption publish endpoint behaving as the
one azd's funcapp_host_client.go talks to (`POST /api/publish` answers 202 and a deployment id;
`GET /api/deployments/{id}` answers 200 with a status: 0-2 in progress, 3 failed, 4 succeeded),
the app's `/metadata`, and Azure Resource Manager's provider registration. The clock is simulated:
each pause advances it, so a 5-minute window runs in a moment."""

import importlib.util
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("deploy", ROOT / "infra" / "deploy.py")
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)


class Clock:
    """A clock that moves only when slept on."""

    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


class StandIn:
    """An HTTP server on loopback whose answers come from `answer(method, path, body)`; every
    request is recorded as (method, path, authorization)."""

    def __init__(self, answer):
        self.requests = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stand_in.requests.append((method, self.path, self.headers.get("Authorization")))
                status, payload = answer(method, self.path, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, method, prefix):
        return sum(1 for m, path, _ in self.requests if m == method and path.startswith(prefix))


@pytest.fixture
def stand_in():
    servers = []

    def make(answer):
        server = StandIn(answer)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def publish_endpoint(scripts):
    """A publish endpoint: the n-th upload plays `scripts[n]`, a list of (status code of the
    upload, then the deployment statuses its polls answer in turn; the last repeats)."""
    state = {"uploads": 0, "polls": {}}

    def answer(method, path, body):
        if method == "POST" and path.startswith("/api/publish"):
            script = scripts[min(state["uploads"], len(scripts) - 1)]
            state["uploads"] += 1
            upload_status, _ = script
            if upload_status != 202:
                return upload_status, {"error": "AuthorizationFailure: the app may not write the package"}
            assert body.startswith(b"PK"), "a zip"
            return 202, f"deployment-{state['uploads']}"
        if method == "GET" and path.startswith("/api/deployments/"):
            deployment = path.rsplit("/", 1)[1]
            number = int(deployment.split("-")[1])
            _, statuses = scripts[min(number - 1, len(scripts) - 1)]
            polls = state["polls"].get(deployment, 0)
            state["polls"][deployment] = polls + 1
            code = statuses[min(polls, len(statuses) - 1)]
            return 200, {"id": deployment, "status": code, "progress": f"step {polls}",
                         "status_text": "Failed to download the package from the deployment storage"
                         if code == 3 else "", "log_url": f"https://scm.example/api/deployments/{deployment}/log"}
        return 404, {}

    return answer


def package(tmp_path):
    path = tmp_path / "app.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("handler", b"binary")
    return path.read_bytes()


def test_a_failed_deployment_is_posted_again_until_one_succeeds(stand_in, tmp_path, capsys):
    # The first deployment fails (storage roles not yet in force), the second succeeds.
    server = stand_in(publish_endpoint([(202, [0, 1, 2, 3]), (202, [1, 2, 4])]))
    clock = Clock()
    tokens = iter(f"token-{n}" for n in range(100))
    state = deploy.deploy(server.url, package(tmp_path), lambda: next(tokens), clock.sleep, clock)
    assert state["status"] == 4
    assert server.count("POST", "/api/publish") == 2
    assert server.count("GET", "/api/deployments/deployment-1") == 4
    assert server.count("GET", "/api/deployments/deployment-2") == 3
    printed = capsys.readouterr().out
    assert "Failed to download the package" in printed and "deployment-1/log" in printed
    # Every request carries a token, fresh at each call.
    assert all(auth and auth.startswith("Bearer token-") for _, _, auth in server.requests)


def test_refused_uploads_are_posted_again_while_roles_propagate(stand_in, tmp_path):
    server = stand_in(publish_endpoint([(403, []), (403, []), (202, [4])]))
    clock = Clock()
    deploy.deploy(server.url, package(tmp_path), lambda: "t", clock.sleep, clock)
    assert server.count("POST", "/api/publish") == 3
    assert clock.slept[:2] == [10.0, 20.0], "backoff"


def test_a_deployment_that_never_succeeds_ends_in_an_error_within_the_window(stand_in, tmp_path, capsys):
    server = stand_in(publish_endpoint([(202, [1, 3])]))
    clock = Clock()
    with pytest.raises(SystemExit) as ended:
        deploy.deploy(server.url, package(tmp_path), lambda: "t", clock.sleep, clock)
    assert "deploying failed after" in str(ended.value)
    assert "Failed to download the package" in str(ended.value)
    assert clock.now <= deploy.DEPLOY_WINDOW_SECS + 60
    uploads = server.count("POST", "/api/publish")
    assert 3 <= uploads <= 10, uploads


def test_a_package_the_endpoint_refuses_is_not_posted_again(stand_in, tmp_path):
    server = stand_in(publish_endpoint([(400, [])]))
    clock = Clock()
    with pytest.raises(SystemExit):
        deploy.deploy(server.url, package(tmp_path), lambda: "t", clock.sleep, clock)
    assert server.count("POST", "/api/publish") == 1


def test_a_deployment_listed_late_is_waited_for(stand_in, tmp_path):
    answers = {"polls": 0}
    inner = publish_endpoint([(202, [4])])

    def answer(method, path, body):
        if method == "GET" and answers["polls"] < 2:
            answers["polls"] += 1
            return 404, {}
        return inner(method, path, body)

    server = stand_in(answer)
    clock = Clock()
    assert deploy.deploy(server.url, package(tmp_path), lambda: "t", clock.sleep, clock)["status"] == 4


def test_the_deploy_ends_only_when_the_app_answers_metadata(stand_in):
    answers = iter([(503, b"starting"), (500, b"handler exited: setting EXPORT_AUTH_ISSUER")]
                   + [(200, {"resourceType": "CapabilityStatement"})] * 3)
    server = stand_in(lambda method, path, body: next(answers))
    clock = Clock()
    deploy.wait_for_app(server.url, clock.sleep, clock)
    assert server.count("GET", "/metadata") == 3

    never = stand_in(lambda method, path, body: (500, b"handler exited: setting EXPORT_AUTH_ISSUER: required"))
    clock = Clock()
    with pytest.raises(SystemExit) as ended:
        deploy.wait_for_app(never.url, clock.sleep, clock)
    assert "EXPORT_AUTH_ISSUER" in str(ended.value)


def test_providers_are_registered_once_and_waited_for(stand_in):
    states = {"Microsoft.App": ["NotRegistered", "Registering", "Registered"],
              "Microsoft.Web": ["Registered"],
              "Microsoft.HealthcareApis": ["Unregistered", "Registered"]}
    reads = {name: 0 for name in states}

    def answer(method, path, body):
        namespace = path.split("/providers/")[1].split("/")[0].split("?")[0]
        if method == "POST":
            assert path.endswith("/register?api-version=2021-04-01")
            return 200, {"namespace": namespace, "registrationState": "Registering"}
        seen = states[namespace]
        state = seen[min(reads[namespace], len(seen) - 1)]
        reads[namespace] += 1
        return 200, {"namespace": namespace, "registrationState": state}

    server = stand_in(answer)
    clock = Clock()
    deploy.register_providers("sub-1", lambda: "t", clock.sleep, clock, management=server.url)
    assert server.count("POST", "/subscriptions/sub-1/providers/Microsoft.App/register") == 1
    assert server.count("POST", "/subscriptions/sub-1/providers/Microsoft.Web/register") == 0
    assert server.count("POST", "/subscriptions/sub-1/providers/Microsoft.HealthcareApis/register") == 1

    refused = stand_in(lambda method, path, body: (200, {"registrationState": "NotRegistered"})
                       if method == "GET" else (403, {"error": {"code": "AuthorizationFailed"}}))
    with pytest.raises(SystemExit) as ended:
        deploy.register_providers("sub-1", lambda: "t", clock.sleep, clock, management=refused.url)
    assert "register/action" in str(ended.value)


def test_the_package_is_the_layout_the_host_expects(tmp_path):
    binary = tmp_path / "handler"
    binary.write_bytes(b"\x7fELF")
    out = tmp_path / "app.zip"
    deploy.write_package(binary, out)
    functions = sorted(p.parent.name for p in (ROOT / "functions").glob("*/function.json"))
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        assert names == ["handler", "host.json"] + [f"{name}/function.json" for name in functions]
        assert (archive.getinfo("handler").external_attr >> 16) & 0o777 == 0o755
        assert archive.read("host.json") == (ROOT / "host.json").read_bytes()
    # The same functions `handler package` writes (handler/package.rs builds them in).
    package_rs = (ROOT / "handler" / "package.rs").read_text()
    assert sorted(set(__import__("re").findall(r'functions/(\w+)/function.json', package_rs))) == functions
