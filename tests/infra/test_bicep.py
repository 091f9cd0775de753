"""Offline checks of infra/: every Bicep file parses (tree-sitter-bicep), and the parsed structure
(pycep-parser) keeps the promises of the deployment: identity only, shared keys off, a firewall
that denies by default, least-privilege roles, the custom runtime, and every setting the handler
reads set as an app setting, the same list as README.md's table."""

import json
import re
from pathlib import Path

import pytest
import tree_sitter_bicep
from pycep import BicepParser
from tree_sitter import Language, Parser

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

ROLE = {
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "serviceBusDataSender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "serviceBusDataReceiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "fhirDataReader": "4c8d0bbc-75d3-4935-991f-5f3c56d81508",
}
BROAD_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",  # Owner
    "b24988ac-6180-42a0-ab88-20f7382dd24c",  # Contributor
    "17d1049b-9a84-46fb-8f53-869881c3d3ab",  # Storage Account Contributor
    "090c5cfd-751d-490a-894a-3ce6f1109419",  # Azure Service Bus Data Owner
}


def parsed(name: str) -> dict:
    return BicepParser().parse(file_path=INFRA / name)


def resources(name: str) -> dict:
    return parsed(name).get("resources", {})


def walk(value):
    """Every dict and list inside a parsed Bicep value."""
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def settings_in(value) -> dict:
    """`{name: value}` of every `{ name: 'X', value: ... }` object inside a parsed value."""
    return {
        item["name"]: item["value"]
        for item in walk(value)
        if isinstance(item, dict) and set(item) == {"name", "value"} and isinstance(item["name"], str)
    }


def readme_table(heading: str) -> list[str]:
    """The first column (backquoted names) of the table under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    names = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            match = re.match(r"\|\s*`([^`]+)`", line)
            if match:
                names.append(match.group(1))
        elif started:
            break
    assert names, f"no table under {heading!r}"
    return names


def app_settings() -> tuple[dict, dict, dict]:
    """(handler settings, host settings, settings written in the app module itself)."""
    app = parsed("main.bicep")["modules"]["app"]["config"]["params"]
    module = resources("modules/functionapp.bicep")["app"]["config"]["properties"]["siteConfig"]
    return settings_in(app["handlerSettings"]), settings_in(app["hostSettings"]), settings_in(module["appSettings"])


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bicep_file_parses(path):
    tree = Parser(Language(tree_sitter_bicep.language())).parse(path.read_bytes())
    bad = [n for n in walk_nodes(tree.root_node) if n.type == "ERROR" or n.is_missing]
    assert not bad, f"syntax errors at {[n.start_point for n in bad]}"
    BicepParser().parse(file_path=path)


def walk_nodes(node):
    yield node
    for child in node.children:
        yield from walk_nodes(child)


def test_modules_exist_and_parameters_file_names_real_parameters():
    main = parsed("main.bicep")
    for module in main["modules"].values():
        assert (INFRA / module["detail"]["path"]).is_file()
    declared = set(main["parameters"])
    given = set(json.loads((INFRA / "main.parameters.json").read_text())["parameters"])
    assert given <= declared, given - declared


def test_storage_accounts_allow_no_shared_key_and_only_tls12():
    accounts = [r for r in resources("modules/storage.bicep").values()
                if r["type"] == "Microsoft.Storage/storageAccounts" and not r["existing"]]
    assert len(accounts) == 2
    for account in accounts:
        properties = account["config"]["properties"]
        assert properties["allowSharedKeyAccess"] is False
        assert properties["allowBlobPublicAccess"] is False
        assert properties["minimumTlsVersion"] == "TLS1_2"
        assert properties["supportsHttpsTrafficOnly"] is True


def test_export_account_firewall_denies_by_default_but_lets_the_app_and_trusted_services_in():
    exports = resources("modules/storage.bicep")["exports"]["config"]["properties"]
    acls = exports["networkAcls"]
    assert acls["defaultAction"] == "Deny"
    assert "AzureServices" in acls["bypass"]
    assert acls["virtualNetworkRules"] == [{"id": "appSubnetId", "action": "Allow"}]
    # The same subnet carries the app (VNet integration) and a storage service endpoint.
    main = parsed("main.bicep")["modules"]
    subnet = json.dumps(main["storage"]["config"]["params"]["appSubnetId"])
    assert json.dumps(main["app"]["config"]["params"]["appSubnetId"]) == subnet
    assert "appSubnetId" in subnet
    app = resources("modules/functionapp.bicep")["app"]["config"]["properties"]
    assert app["virtualNetworkSubnetId"] == "appSubnetId"
    vnet = resources("modules/network.bicep")["vnet"]["config"]["properties"]
    endpoints = [e["service"] for e in vnet["subnets"][0]["properties"]["serviceEndpoints"]]
    assert "Microsoft.Storage" in endpoints


def test_service_bus_takes_entra_tokens_only_and_dead_letters():
    bus = resources("modules/servicebus.bicep")
    assert bus["namespace"]["config"]["properties"]["disableLocalAuth"] is True
    queue = bus["queue"]["config"]["properties"]
    assert queue["deadLetteringOnMessageExpiration"] is True
    assert 1 < queue["maxDeliveryCount"] <= 10
    lock = parsed("main.bicep")["modules"]["serviceBus"]["config"]["params"]["lockDuration"]
    assert lock == "PT5M", "the longest lock Service Bus allows; the host renews it"
    # The queue the functions bind to is the queue Bicep creates.
    queue_name = parsed("main.bicep")["variables"]["shardQueueName"]["value"]
    for function_json in (ROOT / "functions").glob("*/function.json"):
        for binding in json.loads(function_json.read_text())["bindings"]:
            if binding["type"].startswith("serviceBus"):
                assert binding["queueName"] == queue_name, function_json
                assert binding["connection"] == "ServiceBusConnection", function_json


def test_app_settings_hold_no_connection_string_key_or_sas():
    handler, host, module = app_settings()
    everything = {**handler, **host, **module}
    secretish = re.compile(r"(connectionstring|connection_string|accountkey|sharedaccess|_key$|sas)", re.I)
    for name, value in everything.items():
        if name == "APPLICATIONINSIGHTS_CONNECTION_STRING":
            continue  # identifier and endpoint only; see the next assertions
        assert not secretish.search(name), name
        assert not re.search(r"(AccountKey=|SharedAccessKey|sig=)", json.dumps(value)), name
    assert "AzureWebJobsStorage" not in everything, "a plain AzureWebJobsStorage is a connection string"
    assert "ServiceBusConnection" not in everything
    assert "AzureWebJobsStorage__accountName" in host
    assert "ServiceBusConnection__fullyQualifiedNamespace" in host
    assert host["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "Authorization=AAD"
    insights = resources("modules/monitoring.bicep")["insights"]["config"]["properties"]
    assert insights["DisableLocalAuth"] is True
    for path in BICEP_FILES:
        text = path.read_text()
        assert "listKeys" not in text and "listAccountSas" not in text, path


def role_assignments() -> list[dict]:
    found = []
    for name, resource in resources("modules/roles.bicep").items():
        if resource["type"] == "Microsoft.Authorization/roleAssignments":
            config = resource["config"]
            conditional = "condition" in config
            if conditional:
                config = config["config"]
            role = json.dumps(config["properties"]["roleDefinitionId"])
            found.append({"name": name, "scope": config["scope"], "role": role, "conditional": conditional,
                          "principalType": config["properties"]["principalType"]})
    return found


def test_roles_are_the_least_the_app_needs():
    assignments = role_assignments()
    variables = json.dumps(parsed("modules/roles.bicep")["variables"])
    for role_id in ROLE.values():
        assert role_id in variables
    for role_id in BROAD_ROLES:
        assert role_id not in variables
    by_role = {a["role"]: a for a in assignments}

    def scope_of(role_name):
        matches = [a for a in assignments if role_name in a["role"]]
        assert len(matches) == 1, role_name
        return matches[0]["scope"]

    assert scope_of("storageBlobDataContributor") == "exports"
    assert scope_of("storageBlobDataOwner") == "host"
    assert scope_of("serviceBusDataSender") == "serviceBus"
    assert scope_of("serviceBusDataReceiver") == "serviceBus"
    assert scope_of("fhirDataReader") == "fhirService"
    assert all(a["principalType"] == "ServicePrincipal" for a in by_role.values())
    # The FHIR reader role only when a FHIR service is named; the others always.
    assert [a["name"] for a in assignments if a["conditional"]] == ["fhirReader"]
    condition = resources("modules/roles.bicep")["fhirReader"]["config"]["condition"]
    assert "fhirServiceName" in json.dumps(condition)


def test_function_app_runs_the_custom_handler_on_flex_consumption_with_its_identity():
    app_module = resources("modules/functionapp.bicep")
    plan = app_module["plan"]["config"]
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    app = app_module["app"]["config"]
    assert app["kind"] == "functionapp,linux"
    assert app["identity"] == {"type": "SystemAssigned"}
    properties = app["properties"]
    assert properties["httpsOnly"] is True
    config = properties["functionAppConfig"]
    assert config["runtime"]["name"] == "custom"
    assert config["deployment"]["storage"]["authentication"] == {"type": "SystemAssignedIdentity"}
    assert properties["siteConfig"]["ftpsState"] == "Disabled"
    for policy in ("basicPublishingFtp", "basicPublishingScm"):
        assert app_module[policy]["config"]["properties"]["allow"] is False
    outputs = parsed("main.bicep")["outputs"]
    assert {"APP_URL", "EXPORT_ACCOUNT_NAME", "FUNCTION_APP_NAME"} <= set(outputs)


def test_fhir_source_is_an_optional_parameter():
    parameters = parsed("main.bicep")["parameters"]
    assert parameters["fhirServiceUrl"]["default"] == ""
    assert parameters["fhirServiceName"]["default"] == ""
    handler, _, _ = app_settings()
    assert "fhirServiceUrl" in json.dumps(handler["FHIR_SOURCE"])


def test_bicep_and_readme_name_the_same_settings():
    handler, host, module = app_settings()
    assert sorted(handler) == sorted(readme_table("### Handler settings"))
    assert sorted({**host, **module}) == sorted(readme_table("### Function App settings for the Functions host"))


def test_every_setting_the_handler_reads_is_in_the_readme():
    main_rs = (ROOT / "handler" / "main.rs").read_text()
    app_rs = (ROOT / "handler" / "app.rs").read_text()
    read = set(re.findall(r'env = "([A-Z_]+)"', main_rs)) | set(re.findall(r'std::env::var\("([A-Z_]+)"\)', main_rs + app_rs))
    documented = (set(readme_table("### Handler settings")) | set(readme_table("### Local service only"))
                  | set(readme_table("### Remote source with OAuth client credentials")))
    documented.add("FUNCTIONS_CUSTOMHANDLER_PORT")  # set by the host
    documented.add("WEBSITE_HOSTNAME")  # set by App Service: the app's default host name
    documented.add("FHIR_BEARER_TOKEN")  # the `export` client's token, not a service setting
    assert read, "no settings found in the source"
    assert read <= documented, read - documented
    not_in_azure = set(readme_table("### Local service only")) | set(
        readme_table("### Remote source with OAuth client credentials"))
    handler, _, _ = app_settings()
    assert not not_in_azure & set(handler), "a local-only setting or a secret in the app settings"


def test_azure_yaml_provisions_main_bicep_and_deploys_with_the_package_command():
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^\s+path: infra$", text, re.M)
    assert re.search(r"^\s+module: main$", text, re.M)
    assert "infra/deploy.sh" in text
    deploy = (INFRA / "deploy.sh").read_text()
    assert "handler package --out" in deploy
    assert "FUNCTION_APP_NAME" in deploy and "config-zip" in deploy
