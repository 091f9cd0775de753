// The Flex Consumption plan and the Function App: Linux, runtime custom (the Rust handler), a
// system-assigned identity, the deployment package read with that identity, VNet integration.

param name string
param location string
param appSubnetId string
param hostAccountName string
param deploymentContainerUrl string
param applicationInsightsConnectionString string
param maximumInstanceCount int
@description('Settings the handler reads (the README configuration table).')
param handlerSettings array
@description('Settings the Functions host reads: identity-based connections, telemetry auth.')
param hostSettings array

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-${name}'
  location: location
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  kind: 'functionapp,linux'
  identity: { type: 'SystemAssigned' }
  tags: { 'azd-service-name': 'handler' }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    virtualNetworkSubnetId: appSubnetId
    siteConfig: {
      // No ftpsState and no other property Flex Consumption refuses (ARM error 51021): FTP and
      // basic publishing are off through basicPublishingCredentialsPolicies below.
      minTlsVersion: '1.2'
      http20Enabled: true
      appSettings: concat(hostSettings, handlerSettings, [
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: applicationInsightsConnectionString }
      ])
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: { type: 'SystemAssignedIdentity' }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: 2048
      }
      runtime: { name: 'custom', version: '1.0' }
    }
  }
}

resource basicPublishingFtp 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: { allow: false }
}

resource basicPublishingScm 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: { allow: false }
}

output principalId string = app.identity.principalId
output defaultHostName string = app.properties.defaultHostName
output scmHostName string = filter(app.properties.hostNameSslStates, state => state.hostType == 'Repository')[0].name
