// The Service Bus namespace (Entra ID only: local auth disabled) and the shard queue.

param name string
param location string
param queueName string
@description('How long a worker holds a message before the host renews the lock (the host renews up to functionTimeout).')
param lockDuration string

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: 'sb-${name}'
  location: location
  sku: { name: 'Standard', tier: 'Standard' }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = {
  parent: namespace
  name: queueName
  properties: {
    lockDuration: lockDuration
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
    // The handler's QUEUED_MESSAGE_TTL (export/state.rs): a shard queued longer has no message
    // left, and only then does the sweeper send it again.
    defaultMessageTimeToLive: 'P1D'
    requiresDuplicateDetection: false
    enablePartitioning: false
  }
}

output namespaceName string = namespace.name
// The host name from the endpoint the namespace states (`https://{host}:443/`): the cloud's own
// suffix, not an assumed one.
output fullyQualifiedNamespace string = split(split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0], '/')[0]
output queueName string = queue.name
