// A FHIR service of its own when none is given: an Azure Health Data Services workspace and an R4
// FHIR service that takes Entra ID tokens of this tenant. The app gets FHIR Data Reader on it (in
// roles.bicep); whoever loads data needs FHIR Data Contributor, given here to the deploying user
// when asked (so that `handler load` fills the new service).

param name string
param location string
@description('Host name suffix of FHIR services in this cloud (fhir.azurehealthcareapis.com in the public cloud).')
param hostSuffix string
@description('A user (or group, or service principal) given FHIR Data Contributor on the service; empty: none.')
param contributorPrincipalId string = ''
param contributorPrincipalType string = 'User'

// FHIR Data Contributor.
var fhirDataContributor = '5a1fc7df-4bf1-4951-a576-89034ee01acd'

resource workspace 'Microsoft.HealthcareApis/workspaces@2023-11-01' = {
  name: name
  location: location
  properties: {}
}

resource fhir 'Microsoft.HealthcareApis/workspaces/fhirservices@2023-11-01' = {
  parent: workspace
  name: 'fhir'
  location: location
  kind: 'fhir-R4'
  properties: {
    authenticationConfiguration: {
      authority: '${environment().authentication.loginEndpoint}${tenant().tenantId}'
      // The service's own URL, the audience its tokens must name (Microsoft's documented form).
      audience: 'https://${workspace.name}-fhir.${hostSuffix}'
      smartProxyEnabled: false
    }
  }
}

resource contributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(contributorPrincipalId)) {
  name: guid(fhir.id, contributorPrincipalId, fhirDataContributor)
  scope: fhir
  properties: {
    principalId: contributorPrincipalId
    principalType: contributorPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', fhirDataContributor)
  }
}

output serviceName string = '${workspace.name}/${fhir.name}'
output url string = fhir.properties.authenticationConfiguration.audience
