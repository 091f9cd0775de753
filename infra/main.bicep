// fhir-export in an empty resource group: a Flex Consumption Function App (runtime custom) with a
// system-assigned identity, Service Bus for the shard queue, export storage behind a firewall, host
// storage and Application Insights, all reached by identity: no key, connection string or SAS.

targetScope = 'resourceGroup'

@description('Prefix of every resource name (letters and digits, 3-11 characters).')
@minLength(3)
@maxLength(11)
param name string = 'fhirexport'

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Create the export account as ADLS Gen2 (hierarchical namespace).')
param exportIsDataLake bool = true

@description('The FHIR source: the base URL of an existing FHIR service. Empty: an Azure Health Data Services workspace and FHIR service are created here, and the app reads that one.')
param fhirServiceUrl string = ''

@description('With fhirServiceUrl: the name of that FHIR service as `{workspace}/{service}` in this resource group, so the app gets FHIR Data Reader on it (empty: grant the role yourself).')
param fhirServiceName string = ''

@description('Public base URL of the API when a custom domain or gateway fronts it (EXPORT_BASE_URL); empty: the app\'s default host name.')
param baseUrl string = ''

@description('Seconds the FHIR source\'s refusals (401, 403) are waited out before it first answers (EXPORT_ACCESS_WAIT_SECS): the app\'s FHIR Data Reader role, assigned at deployment, takes minutes to take effect.')
param accessWaitSecs int = 600

@description('Roll to a new file past this size (EXPORT_FILE_MAX_BYTES).')
param fileMaxBytes int = 67108864

@description('A shard silent this long is run again (EXPORT_STALE_AFTER_SECS).')
param staleAfterSecs int = 600

@description('Runs of one shard before its export fails (EXPORT_MAX_ATTEMPTS).')
param maxAttempts int = 3

@description('Seconds a failed shard waits, at most, before its first retry; doubled for each later one (EXPORT_RETRY_DELAY_SECS).')
param retryDelaySecs int = 30

@description('Hours a finished export is kept (EXPORT_RETENTION_HOURS).')
param retentionHours int = 168

@description('A type with more resources is split into shards by lastUpdated ranges (EXPORT_SHARD_MAX_RESOURCES); a shard that reads longer than shardMaxSecs goes on in a continuation.')
param shardMaxResources int = 250000

@description('Seconds one run of a shard reads before it pauses and queues its continuation (EXPORT_SHARD_MAX_SECS): 80% of host.json functionTimeout (10 minutes), so that no run reaches the timeout, at which the host restarts the whole handler.')
param shardMaxSecs int = 480

@description('Outputs per manifest page for clients that allow partial manifests (EXPORT_MANIFEST_PAGE_SIZE).')
@minValue(1)
param manifestPageSize int = 1000

@description('How export files are stored (EXPORT_COMPRESSION): none (NDJSON) or gzip (compressed blobs with Content-Encoding: gzip). gzip: about 6x fewer bytes uploaded, stored and downloaded for Synthea data, and an export plus its download faster end to end (BENCHMARKS.md); clients that do not accept gzip get NDJSON through the app (fileUrls proxy), but with fileUrls sas they get the compressed blob.')
@allowed([
  'none'
  'gzip'
])
param compression string = 'gzip'

@description('De-identified export with _anonymizationConfig (EXPORT_DEID): on, or off to refuse its parameters.')
@allowed([
  'on'
  'off'
])
param deid string = 'on'

@description('The container of the export account that holds anonymization configurations (EXPORT_DEID_CONTAINER); created here, upload configurations to it.')
param deidContainer string = 'anonymization'

@description('The largest anonymization configuration read, in bytes (EXPORT_DEID_MAX_CONFIG_BYTES).')
param deidMaxConfigBytes int = 1048576

@description('Whether a de-identified export must name its own _container (EXPORT_DEID_REQUIRE_CONTAINER), as Azure API for FHIR requires.')
@allowed([
  'on'
  'off'
])
param deidRequireContainer string = 'on'

@description('Exports running at once; a kickoff beyond this answers 429 (EXPORT_MAX_RUNNING_EXPORTS).')
param maxRunningExports int = 32

@description('Access control of the API. entra (default): Entra ID tokens of this tenant for an app registration created here, whose read role goes to principalId. issuer: tokens from authIssuer for authAudience (an app registration of your own, or another issuer). off: no access control at all (EXPORT_AUTH=off): anyone who reaches the app can export the whole FHIR store; only for an app reachable from a private network alone.')
@allowed([
  'entra'
  'issuer'
  'off'
])
param accessControl string = 'entra'

@description('With accessControl entra: the user (or group, or service principal) given the API\'s read role; azd passes the signed-in user (AZURE_PRINCIPAL_ID). Empty: assign the role yourself.')
param principalId string = ''

@description('With a FHIR service created here: give principalId FHIR Data Contributor on it, so that `handler load` can fill it with demo data.')
param deployerLoadsData bool = true

@description('What principalId is: User, Group or ServicePrincipal.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('With accessControl issuer: the tokens\' issuer, e.g. https://login.microsoftonline.com/{tenant}/v2.0 (EXPORT_AUTH_ISSUER).')
param authIssuer string = ''

@description('With accessControl issuer: the audiences the tokens may name, separated by commas, e.g. the client id and api://... (EXPORT_AUTH_AUDIENCE).')
param authAudience string = ''

@description('The issuer\'s signing keys; empty reads jwks_uri from its OpenID configuration (EXPORT_AUTH_JWKS_URL).')
param authJwksUrl string = ''

@description('The token endpoint advertised to clients in SMART discovery; empty reads token_endpoint from the issuer\'s OpenID configuration (EXPORT_AUTH_TOKEN_ENDPOINT).')
param authTokenEndpoint string = ''

@description('The manifest\'s file URLs (EXPORT_FILE_URLS): proxy (the app streams each file and checks the token; the Functions host buffers each download whole, up to fileMaxBytes) or sas (short-lived read-only URLs straight to the export account, signed by the app\'s identity; list the clients\' address ranges in downloadClientIpRanges).')
@allowed(['proxy', 'sas'])
param fileUrls string = 'proxy'

@description('With fileUrls sas: client address ranges (CIDR) the export account\'s firewall lets in.')
param downloadClientIpRanges array = []

@description('Host name suffix of Azure Health Data Services FHIR services in this cloud ({workspace}-{service}.{suffix}): fhir.azurehealthcareapis.com in Azure\'s public cloud; set it for another cloud.')
param fhirHostSuffix string = 'fhir.azurehealthcareapis.com'

@description('Largest number of instances the app scales out to.')
param maximumInstanceCount int = 40

// Azure storage's firewall refuses /31 and /32 ranges (a single address goes without a suffix), and
// with fileUrls sas no client could download through a firewall that lets no client in.
var refusedRanges = filter(downloadClientIpRanges, range => endsWith(range, '/31') || endsWith(range, '/32'))
var rangesGiven = fileUrls == 'sas' && empty(downloadClientIpRanges) ? fail('fileUrls sas needs downloadClientIpRanges: the export account\'s firewall lets no client in, so every SAS download would be refused') : downloadClientIpRanges
var downloadRanges = empty(refusedRanges) ? rangesGiven : fail('downloadClientIpRanges: Azure storage refuses /31 and /32 ranges (${join(refusedRanges, ', ')}); give a single address without a suffix')

var suffix = uniqueString(resourceGroup().id, name)
var appName = '${name}-${suffix}'
var shardQueueName = 'export-shards'

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    name: '${name}-${suffix}'
    location: location
  }
}

module network 'modules/network.bicep' = {
  name: 'network'
  params: {
    name: '${name}-${suffix}'
    location: location
  }
}

module fhir 'modules/fhir.bicep' = if (empty(fhirServiceUrl)) {
  name: 'fhir'
  params: {
    name: take(toLower('${name}${suffix}'), 24)
    location: location
    hostSuffix: fhirHostSuffix
    contributorPrincipalId: deployerLoadsData ? principalId : ''
    contributorPrincipalType: principalType
  }
}

module entra 'modules/entra.bicep' = if (accessControl == 'entra') {
  name: 'entra'
  params: {
    name: 'fhir-export-${appName}'
    readerPrincipalId: principalId
    readerPrincipalType: principalType
  }
}

// Open only when asked for outright; else the handler refuses to start without an issuer.
var openSettings = [
  { name: 'EXPORT_AUTH', value: 'off' }
]
var tokenSettings = [
  { name: 'EXPORT_AUTH', value: 'on' }
  { name: 'EXPORT_AUTH_ISSUER', value: accessControl == 'entra' ? entra.outputs.issuer : authIssuer }
  { name: 'EXPORT_AUTH_AUDIENCE', value: accessControl == 'entra' ? entra.outputs.audiences : authAudience }
  { name: 'EXPORT_AUTH_JWKS_URL', value: authJwksUrl }
  { name: 'EXPORT_AUTH_TOKEN_ENDPOINT', value: authTokenEndpoint }
]

// The app always reads a FHIR service: never an embedded store, which the read-only package folder
// of a Flex instance could not hold (and which each instance would hold alone).
var fhirSourceUrl = empty(fhirServiceUrl) ? fhir.outputs.url : fhirServiceUrl
var fhirReaderOn = empty(fhirServiceUrl) ? fhir.outputs.serviceName : fhirServiceName

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    deidContainerName: deidContainer
    hostAccountName: take(toLower('${name}host${suffix}'), 24)
    exportAccountName: take(toLower('${name}data${suffix}'), 24)
    location: location
    exportIsDataLake: exportIsDataLake
    appSubnetId: network.outputs.appSubnetId
    downloadClientIpRanges: downloadRanges
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    name: '${name}-${suffix}'
    location: location
    queueName: shardQueueName
    lockDuration: 'PT5M'
  }
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: appName
    location: location
    appSubnetId: network.outputs.appSubnetId
    hostAccountName: storage.outputs.hostAccountName
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    maximumInstanceCount: maximumInstanceCount
    handlerSettings: concat(
      [
        { name: 'FHIR_SOURCE', value: fhirSourceUrl }
        { name: 'FHIR_SOURCE_AUTH', value: 'azure' }
        { name: 'EXPORT_ACCESS_WAIT_SECS', value: string(accessWaitSecs) }
        { name: 'EXPORT_STORAGE', value: storage.outputs.exportBlobEndpoint }
        { name: 'EXPORT_FILE_MAX_BYTES', value: string(fileMaxBytes) }
        { name: 'EXPORT_STALE_AFTER_SECS', value: string(staleAfterSecs) }
        { name: 'EXPORT_MAX_ATTEMPTS', value: string(maxAttempts) }
        { name: 'EXPORT_RETRY_DELAY_SECS', value: string(retryDelaySecs) }
        { name: 'EXPORT_RETENTION_HOURS', value: string(retentionHours) }
        { name: 'EXPORT_SHARD_MAX_RESOURCES', value: string(shardMaxResources) }
        { name: 'EXPORT_SHARD_MAX_SECS', value: string(shardMaxSecs) }
        { name: 'EXPORT_MANIFEST_PAGE_SIZE', value: string(manifestPageSize) }
        { name: 'EXPORT_COMPRESSION', value: compression }
        { name: 'EXPORT_DEID', value: deid }
        { name: 'EXPORT_DEID_CONTAINER', value: deidContainer }
        { name: 'EXPORT_DEID_MAX_CONFIG_BYTES', value: string(deidMaxConfigBytes) }
        { name: 'EXPORT_DEID_REQUIRE_CONTAINER', value: deidRequireContainer }
        { name: 'EXPORT_MAX_RUNNING_EXPORTS', value: string(maxRunningExports) }
        { name: 'EXPORT_FILE_URLS', value: fileUrls }
      ],
      empty(baseUrl) ? [] : [
        { name: 'EXPORT_BASE_URL', value: baseUrl }
      ],
      accessControl == 'off' ? openSettings : tokenSettings
    )
    hostSettings: [
      { name: 'AzureWebJobsStorage__accountName', value: storage.outputs.hostAccountName }
      { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
      { name: 'ServiceBusConnection__fullyQualifiedNamespace', value: serviceBus.outputs.fullyQualifiedNamespace }
      { name: 'ServiceBusConnection__credential', value: 'managedidentity' }
      { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }
    ]
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    principalId: app.outputs.principalId
    hostAccountName: storage.outputs.hostAccountName
    exportAccountName: storage.outputs.exportAccountName
    serviceBusName: serviceBus.outputs.namespaceName
    shardQueueName: serviceBus.outputs.queueName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    fhirServiceName: fhirReaderOn
  }
}

// Read by azd (and infra/deploy.sh) after provisioning.
output APP_URL string = 'https://${app.outputs.defaultHostName}'
output FUNCTION_APP_NAME string = appName
output EXPORT_ACCOUNT_NAME string = storage.outputs.exportAccountName
output EXPORT_BLOB_ENDPOINT string = storage.outputs.exportBlobEndpoint
output FHIR_SOURCE string = fhirSourceUrl
output SCM_HOST_NAME string = app.outputs.scmHostName
// What a user asks a token for (az account get-access-token --scope ...); empty unless entra.
output EXPORT_TOKEN_SCOPE string = accessControl == 'entra' ? entra.outputs.tokenScope : ''
output ACCESS_CONTROL string = accessControl
