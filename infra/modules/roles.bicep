// Least privilege for the app's identity: read and write blobs of the export account, own the host
// account's blobs (runtime leases, the deployment package), send and receive on the shard queue's
// namespace, publish telemetry, and optionally read the FHIR service.

param principalId string
param hostAccountName string
param exportAccountName string
param serviceBusName string
param applicationInsightsName string
@description('`{workspace}/{service}` of an Azure Health Data Services FHIR service, or empty.')
param fhirServiceName string = ''

var roleIds = {
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  fhirDataReader: '4c8d0bbc-75d3-4935-991f-5f3c56d81508'
}

resource exports 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: exportAccountName
}

resource host 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: hostAccountName
}

resource serviceBus 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' existing = {
  name: serviceBusName
}

resource insights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource exportWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(exports.id, principalId, roleIds.storageBlobDataContributor)
  scope: exports
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
  }
}

resource hostOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(host.id, principalId, roleIds.storageBlobDataOwner)
  scope: host
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataOwner)
  }
}

resource queueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(serviceBus.id, principalId, roleIds.serviceBusDataSender)
  scope: serviceBus
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)
  }
}

resource queueReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(serviceBus.id, principalId, roleIds.serviceBusDataReceiver)
  scope: serviceBus
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataReceiver)
  }
}

resource telemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, principalId, roleIds.monitoringMetricsPublisher)
  scope: insights
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
  }
}

resource fhirService 'Microsoft.HealthcareApis/workspaces/fhirservices@2023-11-01' existing = if (!empty(fhirServiceName)) {
  name: empty(fhirServiceName) ? 'none/none' : fhirServiceName
}

resource fhirReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(fhirServiceName)) {
  name: guid(resourceGroup().id, fhirServiceName, principalId, roleIds.fhirDataReader)
  scope: fhirService
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.fhirDataReader)
  }
}
