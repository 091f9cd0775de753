"""Offline checks of infra/: every Bicep file parses (tree-sitter-bicep), and the parsed structure
(pycep-parser) keeps the promises of the deployment: identity only, shared keys off, a firewall
that denies by default, least-privilege roles, the custom runtime, and every setting the handler
reads set as an app setting, the same list as the table of docs/configuration.md."""

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
    "storageQueueDataContributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "serviceBusDataOwner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "fhirDataReader": "4c8d0bbc-75d3-4935-991f-5f3c56d81508",
}
BROAD_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",  # Owner
    "b24988ac-6180-42a0-ab88-20f7382dd24c",  # Contributor
    "17d1049b-9a84-46fb-8f53-869881c3d3ab",  # Storage Account Contributor
}
# Site config properties Flex Consumption refuses (ARM error 51021 and its kin).
FLEX_REFUSES = {"ftpsState", "use32BitWorkerProcess", "netFrameworkVersion", "linuxFxVersion", "alwaysOn",
                "functionAppScaleLimit", "preWarmedInstanceCount"}


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


def settings_table(heading: str) -> list[str]:
    """The first column (backquoted names) of the table under a heading of docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text()
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
    main = parsed("main.bicep")
    app = main["modules"]["app"]["config"]["params"]
    module = resources("modules/functionapp.bicep")["app"]["config"]["properties"]["siteConfig"]
    # The access-control settings are one of two lists, picked by accessControl.
    access = {**settings_in(main["variables"]["openSettings"]), **settings_in(main["variables"]["tokenSettings"])}
    return ({**settings_in(app["handlerSettings"]), **access}, settings_in(app["hostSettings"]),
            settings_in(module["appSettings"]))


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bicep_file_parses(path):
    # tree-sitter-bicep 1.1.0 (the newest on PyPI) predates the `extension` statement, which
    # pycep-parser reads: that one line is blanked for tree-sitter, byte for byte.
    source = re.sub(rb"(?m)^extension \w+$", lambda m: b" " * len(m.group(0)), path.read_bytes())
    tree = Parser(Language(tree_sitter_bicep.language())).parse(source)
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


def test_the_views_container_the_handler_reads_is_created_private_on_the_export_account():
    handler_name = re.search(r'VIEWS_CONTAINER: &str = "([^"]+)"',
                             (ROOT / "handler" / "export" / "views.rs").read_text()).group(1)
    containers = [r for r in resources("modules/storage.bicep").values()
                  if r["type"] == "Microsoft.Storage/storageAccounts/blobServices/containers"]
    views = [c for c in containers if c["config"]["name"] == handler_name]
    assert len(views) == 1, [c["config"]["name"] for c in containers]
    assert views[0]["config"]["properties"]["publicAccess"] == "None"
    assert views[0]["config"]["parent"] == "exportBlobs"


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
    # A message expires when the sweeper takes it for lost and sends the shard again: not before.
    state_rs = (ROOT / "handler" / "export" / "state.rs").read_text()
    days = re.search(r"QUEUED_MESSAGE_TTL: Duration = Duration::days\((\d+)\)", state_rs).group(1)
    assert queue["defaultMessageTimeToLive"] == f"P{days}D"
    # The queue the functions bind to is the queue Bicep creates.
    queue_name = parsed("main.bicep")["variables"]["shardQueueName"]["value"]
    for function_json in (ROOT / "functions").glob("*/function.json"):
        for binding in json.loads(function_json.read_text())["bindings"]:
            if binding["type"].startswith("serviceBus"):
                assert binding["queueName"] == queue_name, function_json
                assert binding["connection"] == "ServiceBusConnection", function_json


def test_a_shard_run_stops_well_before_the_function_timeout_and_before_it_is_taken_for_stale():
    """The host restarts the whole handler at functionTimeout: each run of a shard pauses at
    EXPORT_SHARD_MAX_SECS, 80% of it, and a run is not taken for silent (stale) before then."""
    host = json.loads((ROOT / "host.json").read_text())
    hours, minutes, seconds = (int(part) for part in host["functionTimeout"].split(":"))
    timeout = hours * 3600 + minutes * 60 + seconds
    params = parsed("main.bicep")["parameters"]
    assert params["shardMaxSecs"]["default"] == timeout * 8 // 10
    handler, _, _ = app_settings()
    assert "EXPORT_SHARD_MAX_SECS" in handler
    assert params["staleAfterSecs"]["default"] > params["shardMaxSecs"]["default"]
    lock_renewal = host["extensions"]["serviceBus"]["maxAutoLockRenewalDuration"]
    hours, minutes, seconds = (int(part) for part in lock_renewal.split(":"))
    assert hours * 3600 + minutes * 60 + seconds >= timeout, "a message's lock outlives its run"


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
    # The host keeps its diagnostics events in tables and may use queues of its account.
    assert scope_of("storageQueueDataContributor") == "host"
    assert scope_of("storageTableDataContributor") == "host"
    # The trigger's scaler reads the queue length (the Manage claim): Data Owner, on the queue alone.
    assert scope_of("serviceBusDataOwner") == "shardQueue"
    queue = resources("modules/roles.bicep")["shardQueue"]["config"]
    assert queue["parent"] == "serviceBus" and queue["name"] == "shardQueueName"
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
    refused = FLEX_REFUSES & set(properties["siteConfig"])
    assert not refused, f"Flex Consumption refuses {refused}"
    for policy in ("basicPublishingFtp", "basicPublishingScm"):
        assert app_module[policy]["config"]["properties"]["allow"] is False
    outputs = parsed("main.bicep")["outputs"]
    assert {"APP_URL", "EXPORT_ACCOUNT_NAME", "FUNCTION_APP_NAME"} <= set(outputs)


def test_the_app_always_reads_a_fhir_service_created_here_unless_one_is_given():
    main = parsed("main.bicep")
    parameters = main["parameters"]
    assert parameters["fhirServiceUrl"]["default"] == ""
    assert parameters["fhirServiceName"]["default"] == ""
    handler, _, _ = app_settings()
    assert json.dumps(handler["FHIR_SOURCE"]) == '"fhirSourceUrl"'
    assert handler["FHIR_SOURCE_AUTH"] == "azure"
    text = (INFRA / "main.bicep").read_text()
    assert "sqlite" not in text, "never an embedded store in Azure"
    assert re.search(r"var fhirSourceUrl = empty\(fhirServiceUrl\) \? fhir\.outputs\.url : fhirServiceUrl", text)
    assert re.search(r"var fhirReaderOn = empty\(fhirServiceUrl\) \? fhir\.outputs\.serviceName : fhirServiceName", text)
    fhir_module = main["modules"]["fhir"]
    assert "fhirServiceUrl" in json.dumps(fhir_module["config"]["condition"])
    created = resources("modules/fhir.bicep")
    assert created["fhir"]["config"]["kind"] == "fhir-R4"
    assert created["fhir"]["type"] == "Microsoft.HealthcareApis/workspaces/fhirservices"


def test_no_identity_the_app_lacks_and_no_suffix_assumed():
    main_text = (INFRA / "main.bicep").read_text()
    assert "userAssignedClientId" not in main_text and "AZURE_CLIENT_ID" not in main_text
    for path in BICEP_FILES:
        text = path.read_text()
        for suffix in ("servicebus.windows.net", "azurewebsites.net", "core.windows.net"):
            assert suffix not in text, f"{path.name} assumes {suffix}"


def test_bicep_and_readme_name_the_same_settings():
    handler, host, module = app_settings()
    assert sorted(handler) == sorted(settings_table("## Handler settings"))
    assert sorted({**host, **module}) == sorted(settings_table("## Function App settings for the Functions host"))


def test_every_setting_the_handler_reads_is_in_the_readme():
    main_rs = (ROOT / "handler" / "main.rs").read_text()
    app_rs = (ROOT / "handler" / "app.rs").read_text()
    read = set(re.findall(r'env = "([A-Z_]+)"', main_rs)) | set(re.findall(r'std::env::var(?:_os)?\("([A-Z_]+)"\)', main_rs + app_rs))
    documented = (set(settings_table("## Handler settings")) | set(settings_table("## Local service only"))
                  | set(settings_table("## Remote source with OAuth client credentials")))
    documented.add("FUNCTIONS_CUSTOMHANDLER_PORT")  # set by the host
    documented.add("WEBSITE_HOSTNAME")  # set by App Service: the app's default host name
    documented.add("WEBSITE_INSTANCE_ID")  # set by App Service: running in Azure
    documented.add("AZURE_CLIENT_ID")  # the Azure SDKs' convention for a user-assigned identity
    documented.add("FHIR_BEARER_TOKEN")  # the `export` client's token, not a service setting
    assert read, "no settings found in the source"
    assert read <= documented, read - documented
    not_in_azure = set(settings_table("## Local service only")) | set(
        settings_table("## Remote source with OAuth client credentials"))
    handler, _, _ = app_settings()
    assert not not_in_azure & set(handler), "a local-only setting or a secret in the app settings"


def test_azure_yaml_provisions_main_bicep_and_deploys_with_the_package_command():
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^\s+path: infra$", text, re.M)
    assert re.search(r"^\s+module: main$", text, re.M)
    assert re.search(r"posix:\s+shell: sh\s+run: python3 infra/deploy.py", text)
    assert re.search(r"windows:\s+shell: pwsh\s+run: python infra/deploy.py", text)
    assert re.search(r"preprovision:\s+posix:\s+shell: sh\s+run: python3 infra/deploy.py register-providers", text)
    deploy = (INFRA / "deploy.py").read_text()
    # Only azd, Rust and Python: no Azure CLI, no pip into the system Python, the cross-compiled
    # binary never run here, the app from azd's environment (tests/infra/test_deploy.py runs it).
    assert not re.search(r'\baz\b"|"az"', deploy)
    assert "venv.create" in deploy and "azd\", \"env\", \"get-values" in deploy.replace("'", '"')
    compile(deploy, "deploy.py", "exec")
    assert "SCM_HOST_NAME" in parsed("main.bicep")["outputs"]


def test_the_deploy_script_is_clean_python_for_3_9_and_later():
    import ast
    from pyflakes.api import check
    from pyflakes.reporter import Reporter
    import io
    out, err = io.StringIO(), io.StringIO()
    source = (INFRA / "deploy.py").read_text()
    warnings = check(source, "infra/deploy.py", Reporter(out, err))
    assert warnings == 0, out.getvalue() + err.getvalue()
    ast.parse(source, feature_version=(3, 9))


def test_the_api_is_protected_by_entra_id_unless_open_access_is_asked_for():
    main = parsed("main.bicep")
    control = main["parameters"]["accessControl"]
    assert control["default"] == "entra"
    allowed = next(d["argument"] for d in control["decorators"] if d["type"] == "allowed")
    assert allowed == ["entra", "issuer", "off"]
    opened = settings_in(main["variables"]["openSettings"])
    assert opened == {"EXPORT_AUTH": "off"}
    tokens = settings_in(main["variables"]["tokenSettings"])
    assert tokens["EXPORT_AUTH"] == "on"
    text = (INFRA / "main.bicep").read_text()
    assert "value: accessControl == 'entra' ? entra.outputs.issuer : authIssuer" in text
    assert "value: accessControl == 'entra' ? entra.outputs.audiences : authAudience" in text
    assert "accessControl == 'off' ? openSettings : tokenSettings" in text
    assert "module entra 'modules/entra.bicep' = if (accessControl == 'entra')" in text
    given = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert given["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"
    assert given["accessControl"]["value"] == "entra"


def test_the_app_registration_issues_v2_tokens_with_a_read_role_for_the_deployer():
    entra = parsed("modules/entra.bicep")
    assert entra["extensions"], "the Microsoft Graph extension"
    aliases = json.loads((INFRA / "bicepconfig.json").read_text())["extensions"]
    assert aliases["microsoftGraphV1"].startswith("br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:")
    assert "extension microsoftGraphV1" in (INFRA / "modules" / "entra.bicep").read_text()
    found = entra["resources"]
    app = found["api"]["config"]
    assert found["api"]["type"] == "Microsoft.Graph/applications"
    assert app["api"]["requestedAccessTokenVersion"] == 2
    assert app["signInAudience"] == "AzureADMyOrg"
    (role,) = app["appRoles"]
    assert role["value"] == "system/*.read" and role["isEnabled"] is True
    assert app["api"]["preAuthorizedApplications"][0]["appId"] == "azureCliClientId"
    assert entra["variables"]["azureCliClientId"]["value"] == "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
    principal = found["apiPrincipal"]["config"]
    assert principal["appRoleAssignmentRequired"] is True
    assert found["readerRole"]["type"] == "Microsoft.Graph/appRoleAssignedTo"
    outputs = entra["outputs"]
    assert "/v2.0" in str(outputs["issuer"]["value"])
    assert "tenant()" in str(outputs["issuer"]["value"]) or "tenant" in str(outputs["issuer"])
    assert {"issuer", "audiences", "tokenScope", "clientId"} <= set(outputs)


def test_no_service_bus_service_endpoint_and_no_fhir_host_literal():
    network = (INFRA / "modules" / "network.bicep").read_text()
    assert "Microsoft.ServiceBus" not in network
    assert "Microsoft.Storage" in network
    fhir = (INFRA / "modules" / "fhir.bicep").read_text()
    assert "audience: 'https://${workspace.name}-fhir.${hostSuffix}'" in fhir
    sweeper = json.loads((ROOT / "functions" / "StaleSweeper" / "function.json").read_text())
    assert sweeper["bindings"][0]["schedule"] == "0 */5 * * * *"


def test_sas_downloads_need_client_ranges_that_storage_accepts():
    main = parsed("main.bicep")
    variables = main["variables"]
    assert {"refusedRanges", "rangesGiven", "downloadRanges"} <= set(variables)
    text = (INFRA / "main.bicep").read_text()
    assert "endsWith(range, '/31') || endsWith(range, '/32')" in text
    assert "fileUrls == 'sas' && empty(downloadClientIpRanges) ? fail(" in text
    assert "empty(refusedRanges) ? rangesGiven : fail(" in text
    storage = main["modules"]["storage"]["config"]["params"]
    assert storage["downloadClientIpRanges"] == "downloadRanges"


def test_the_deployer_may_load_data_into_the_fhir_service_created_here():
    fhir = resources("modules/fhir.bicep")
    contributor = fhir["contributor"]["config"]
    assert "5a1fc7df-4bf1-4951-a576-89034ee01acd" in json.dumps(parsed("modules/fhir.bicep")["variables"])
    assert contributor["config"]["scope"] == "fhir"
    assert "contributorPrincipalId" in json.dumps(fhir["contributor"]["config"]["condition"])
    config = parsed("main.bicep")["modules"]["fhir"]["config"]
    params = config.get("params") or config["config"]["params"]  # a conditional module nests it
    assert "deployerLoadsData" in json.dumps(params["contributorPrincipalId"])
