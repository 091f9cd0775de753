// Least privilege for the app's identity: read and write blobs of the export account; on the host
// account own the blobs (runtime leases, the deployment package) and use queues and tables (the host
// keeps diagnostics events in tables); own the shard queue (that queue only); publish telemetry;
// read the FHIR service.

param principalId string
param hostAccountName string
param exportAccountName string
param serviceBusName string
param shardQueueName string
param applicationInsightsName string
@description('`{workspace}/{service}` of an Azure Health Data Services FHIR service, or empty.')
param fhirServiceName string = ''

var roleIds = {
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
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

resource shardQueue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' existing = {
  parent: serviceBus
  name: shardQueueName
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

resource hostQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(host.id, principalId, roleIds.storageQueueDataContributor)
  scope: host
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageQueueDataContributor)
  }
}

resource hostTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(host.id, principalId, roleIds.storageTableDataContributor)
  scope: host
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
  }
}

// Data Owner, not Sender and Receiver: the Service Bus trigger's scaler reads the queue's length,
// which takes the Manage claim; without it Flex scales the shard workers out slowly. Scoped to
// the shard queue alone.
resource shardQueueOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(shardQueue.id, principalId, roleIds.serviceBusDataOwner)
  scope: shardQueue
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataOwner)
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
