// Entra ID access control for the API (the default of main.bicep): an app registration whose tokens
// the handler accepts, with one app role, `system/*.read` (read every resource type), given to
// the deploying user. Tokens are v2 (`aud` the client id, `iss` .../{tenant}/v2.0). Azure CLI is
// pre-authorized for the delegated scope, so `az account get-access-token --scope {scope}` gives
// the user a token carrying the role, with no consent prompt. Only users and applications assigned
// a role get a token at all (appRoleAssignmentRequired).
//
// The deploying user needs to be able to register applications in the tenant (members can by
// default; else the Application Developer role): without it this module fails with
// Authorization_RequestDenied and nothing is opened; deploy with accessControl 'issuer' and an
// app registration an administrator made.

// The Microsoft Graph extension, by its alias in infra/bicepconfig.json (v1.0, 1.0.0).
extension microsoftGraphV1

@description('Unique name of the app registration (Graph uniqueName), e.g. fhir-export-{suffix}.')
param name string

@description('Object id of the user given the read role (azd: AZURE_PRINCIPAL_ID); empty: none.')
param readerPrincipalId string = ''

@description('User, Group or ServicePrincipal.')
param readerPrincipalType string = 'User'

var readRoleId = guid(tenant().tenantId, name, 'system/*.read')
var delegatedScopeId = guid(tenant().tenantId, name, 'user_impersonation')
// Azure CLI's public client id (first party, the same in every tenant).
var azureCliClientId = '04b07795-8ddb-461a-bbee-02f9e1bf7b46'
// The tenant-scoped form Entra accepts without a verified domain.
var identifierUri = 'api://${tenant().tenantId}/${name}'

resource api 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: name
  displayName: name
  signInAudience: 'AzureADMyOrg'
  identifierUris: [identifierUri]
  api: {
    requestedAccessTokenVersion: 2
    oauth2PermissionScopes: [
      {
        id: delegatedScopeId
        value: 'user_impersonation'
        type: 'User'
        isEnabled: true
        adminConsentDisplayName: 'Use the bulk export API as the signed-in user'
        adminConsentDescription: 'Lets the application call the bulk export API as the signed-in user, within the roles the user holds.'
        userConsentDisplayName: 'Use the bulk export API as you'
        userConsentDescription: 'Lets the application call the bulk export API as you, within the roles you hold.'
      }
    ]
    preAuthorizedApplications: [
      {
        appId: azureCliClientId
        delegatedPermissionIds: [delegatedScopeId]
      }
    ]
  }
  appRoles: [
    {
      id: readRoleId
      value: 'system/*.read'
      allowedMemberTypes: ['User', 'Application']
      isEnabled: true
      displayName: 'Bulk export of every resource type'
      description: 'Start exports of every resource type and download their files.'
    }
  ]
}

resource apiPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: api.appId
  appRoleAssignmentRequired: true
}

resource readerRole 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (!empty(readerPrincipalId)) {
  appRoleId: readRoleId
  principalId: readerPrincipalId
  principalType: readerPrincipalType
  resourceId: apiPrincipal.id
}

@description('The tokens\' issuer (EXPORT_AUTH_ISSUER).')
output issuer string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
@description('The accepted audiences (EXPORT_AUTH_AUDIENCE): the client id, and the Application ID URI.')
output audiences string = '${api.appId},${identifierUri}'
@description('The scope a user asks a token for: az account get-access-token --scope ...')
output tokenScope string = '${identifierUri}/.default'
output clientId string = api.appId
