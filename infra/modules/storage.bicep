// Host storage (the Functions runtime and the deployment package) and the export account
// (the NDJSON files and job state). Shared keys are disabled on both: identity only.
// The export account's firewall denies by default, lets trusted Azure services through, and allows
// the app's subnet.

param hostAccountName string
param exportAccountName string
param location string
param exportIsDataLake bool
param appSubnetId string
@description('Client address ranges (CIDR) let through the export account\'s firewall: the clients of EXPORT_FILE_URLS=sas download from it directly.')
param downloadClientIpRanges array = []

@description('The container anonymization configurations are uploaded to (EXPORT_DEID_CONTAINER).')
param deidContainerName string

var deploymentContainerName = 'app-package'

resource host 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: hostAccountName
  location: location
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
  }
}

resource hostBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: host
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: hostBlobs
  name: deploymentContainerName
  properties: { publicAccess: 'None' }
}

resource exports 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: exportAccountName
  location: location
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
  properties: {
    isHnsEnabled: exportIsDataLake
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Deny'
      bypass: 'AzureServices'
      virtualNetworkRules: [
        { id: appSubnetId, action: 'Allow' }
      ]
      ipRules: [for range in downloadClientIpRanges: { value: range, action: 'Allow' }]
    }
  }
}

output hostAccountName string = host.name
output exportAccountName string = exports.name
output exportBlobEndpoint string = exports.properties.primaryEndpoints.blob
output deploymentContainerUrl string = '${host.properties.primaryEndpoints.blob}${deploymentContainerName}'

resource exportBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: exports
  name: 'default'
}

// Where users upload anonymization configurations (_anonymizationConfig names a blob of it); the
// app reads them with its identity, which holds Storage Blob Data Contributor on the account.
resource deidContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: exportBlobs
  name: deidContainerName
  properties: { publicAccess: 'None' }
}

// Where users store SQL on FHIR views that $viewdefinition-export names by viewReference
// (ViewDefinition/{name} is the blob {name}.json); read with the app's identity, as above.
resource viewsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: exportBlobs
  name: 'views'
  properties: { publicAccess: 'None' }
}
