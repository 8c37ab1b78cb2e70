"""Minimal JSON Schemas of the custom resources deploy/k8s/ uses, for tests/test_k8s.py.

No PyPI package ships KEDA's or the RabbitMQ Cluster Operator's CRDs, so these are written by
hand from the fields the projects define, and kept small: every object lists the properties of
its type (unknown ones are refused, as the API server's structural schemas prune and `kubectl
apply --validate=strict` refuses them), with types for the ones deploy/k8s/ sets.

- ScaledObject and TriggerAuthentication (keda.sh/v1alpha1): KEDA's Go types in
  apis/keda/v1alpha1 (scaledobject_types.go, triggerauthentication_types.go), from which its
  CRDs in config/crd/bases/ are generated, and the reference at keda.sh/docs ("Scaling
  Deployments", "Authentication"). The trigger metadata keys of the two scalers used are in
  RABBITMQ_METADATA and CPU_METADATA, from the scalers' metadata structs
  (pkg/scalers/rabbitmq_scaler.go, cpu_memory_scaler.go).
- RabbitmqCluster (rabbitmq.com/v1beta1): the operator's RabbitmqClusterSpec in
  api/v1beta1/rabbitmqcluster_types.go.
- User and Permission (rabbitmq.com/v1beta1): the Messaging Topology Operator's UserSpec and
  PermissionSpec in api/v1beta1/user_types.go and permission_types.go, with the
  RabbitmqClusterReference of rabbitmq_cluster_reference.go.

Fields of Kubernetes types inside them (an HPA's `behavior`, a container's `resources`) are
left open here: the test validates them with the Kubernetes schemas of kubernetes-validate.
"""

from __future__ import annotations

from typing import Any

OPEN: dict[str, Any] = {"type": "object"}  # a Kubernetes type, checked elsewhere
INT = {"type": "integer"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": STR}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object with exactly these properties (any may be absent unless required)."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata = {"type": "object", "required": ["name"],
                "properties": {"name": STR, "namespace": STR, "labels": STRING_MAP,
                               "annotations": STRING_MAP}}
    return closed({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                   "metadata": metadata, "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", closed({
    "scaleTargetRef": closed({"apiVersion": STR, "kind": STR, "name": STR,
                              "envSourceContainerName": STR}, ("name",)),
    "pollingInterval": INT,
    "cooldownPeriod": INT,
    "initialCooldownPeriod": INT,
    "idleReplicaCount": INT,
    "minReplicaCount": INT,
    "maxReplicaCount": INT,
    "fallback": closed({"failureThreshold": INT, "replicas": INT, "behavior": STR},
                       ("failureThreshold", "replicas")),
    "advanced": closed({
        "restoreToOriginalReplicaCount": BOOL,
        "horizontalPodAutoscalerConfig": closed({"name": STR, "behavior": OPEN}),
        "scalingModifiers": closed({"formula": STR, "target": STR, "activationTarget": STR,
                                    "metricType": STR}),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": closed({
        "type": STR,
        "name": STR,
        "metadata": STRING_MAP,  # every value a string, numbers included
        "authenticationRef": closed({"name": STR, "kind": {
            "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}, ("name",)),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": BOOL,
    }, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))

_SECRET_TARGET = closed({"parameter": STR, "name": STR, "key": STR}, ("parameter", "name", "key"))
_ENV_TARGET = closed({"parameter": STR, "name": STR, "containerName": STR}, ("parameter", "name"))

TRIGGER_AUTHENTICATION = resource("keda.sh/v1alpha1", "TriggerAuthentication", closed({
    "secretTargetRef": {"type": "array", "items": _SECRET_TARGET},
    "configMapTargetRef": {"type": "array", "items": _SECRET_TARGET},
    "env": {"type": "array", "items": _ENV_TARGET},
    "podIdentity": OPEN,
    "hashiCorpVault": OPEN,
    "azureKeyVault": OPEN,
    "awsSecretManager": OPEN,
    "gcpSecretManager": OPEN,
    "boundServiceAccountToken": {"type": "array"},
}))

# The keys each scaler reads from a trigger's metadata (names ending in FromEnv read the value
# from the target container's environment).
RABBITMQ_METADATA = {
    "host", "hostFromEnv", "usernameFromEnv", "passwordFromEnv", "protocol", "vhostName",
    "queueName", "mode", "value", "activationValue", "queueLength", "useRegex",
    "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
}
# The parameters a TriggerAuthentication may give the RabbitMQ scaler.
RABBITMQ_AUTH_PARAMETERS = {
    "host", "protocol", "vhostName", "username", "password", "ca", "cert", "key", "keyPassword",
    "tls", "workloadIdentityResource",
}
CPU_METADATA = {"type", "value", "containerName"}
# The metrics-api scaler: a number at a GJSON path of a JSON document (bearer auth since 2.13).
METRICS_API_METADATA = {
    "url", "valueLocation", "targetValue", "activationTargetValue", "format", "authMode",
    "method", "keyParamName", "unsafeSsl", "aggregateFromKubeServiceEndpoints",
    "aggregationType",
}
METRICS_API_AUTH_PARAMETERS = {"apiKey", "username", "password", "ca", "cert", "key", "token"}

RABBITMQ_CLUSTER = resource("rabbitmq.com/v1beta1", "RabbitmqCluster", closed({
    "replicas": {"type": "integer", "minimum": 0},
    "image": STR,
    "imagePullSecrets": {"type": "array"},
    "service": closed({"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                       "annotations": STRING_MAP, "ipFamilyPolicy": STR}),
    "persistence": closed({"storageClassName": STR, "storage": {"type": ["string", "integer"]}}),
    "resources": OPEN,
    "affinity": OPEN,
    "tolerations": {"type": "array"},
    "rabbitmq": closed({
        "additionalPlugins": {"type": "array", "maxItems": 100,
                              "items": {"type": "string", "pattern": r"^\w+$"}},
        "additionalConfig": {"type": "string", "maxLength": 2000},
        "advancedConfig": STR,
        "envConfig": STR,
        "erlangInetConfig": STR,
    }),
    "tls": closed({"secretName": STR, "caSecretName": STR, "disableNonTLSListeners": BOOL}),
    "override": closed({"statefulSet": OPEN, "service": OPEN}),
    "skipPostDeploySteps": BOOL,
    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
    "delayStartSeconds": {"type": "integer", "minimum": 0},
    "secretBackend": OPEN,
    "autoEnableAllFeatureFlags": BOOL,
}))

# Which RabbitmqCluster a topology resource is for: by name, or by a Secret with the management
# API's URI, not both (the webhook refuses that).
_CLUSTER_REFERENCE = {"oneOf": [
    closed({"name": STR, "namespace": STR}, ("name",)),
    closed({"connectionSecret": closed({"name": STR}, ("name",))}, ("connectionSecret",)),
]}
_NAME_REFERENCE = closed({"name": STR}, ("name",))  # a LocalObjectReference

USER = resource("rabbitmq.com/v1beta1", "User", closed({
    "tags": {"type": "array", "items": {
        "enum": ["management", "policymaker", "monitoring", "administrator"]}},
    "rabbitmqClusterReference": _CLUSTER_REFERENCE,
    "importCredentialsSecret": _NAME_REFERENCE,
}, ("rabbitmqClusterReference",)))

PERMISSION = resource("rabbitmq.com/v1beta1", "Permission", {
    **closed({
        "user": STR,
        "userReference": _NAME_REFERENCE,
        "vhost": STR,
        "permissions": closed({"configure": STR, "write": STR, "read": STR}),
        "rabbitmqClusterReference": _CLUSTER_REFERENCE,
    }, ("vhost", "permissions", "rabbitmqClusterReference")),
    # A user by name or by reference: the webhook refuses both and neither.
    "oneOf": [{"required": ["user"]}, {"required": ["userReference"]}],
})

SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): RABBITMQ_CLUSTER,
    ("rabbitmq.com/v1beta1", "User"): USER,
    ("rabbitmq.com/v1beta1", "Permission"): PERMISSION,
}

# The Secret the operator makes for a RabbitmqCluster NAME: NAME-default-user, with these keys
# (internal/resource/default_user_secret.go).
OPERATOR_USER_SECRET_SUFFIX = "-default-user"
OPERATOR_USER_SECRET_KEYS = {"username", "password", "host", "port", "provider", "type",
                             "default_user.conf"}

# The Secret the Messaging Topology Operator makes for a User NAME without
# importCredentialsSecret: NAME-user-credentials, a generated username and password
# (controllers/user_controller.go; `passwordHash` instead of `password` only when imported so).
USER_CREDENTIALS_SECRET_SUFFIX = "-user-credentials"
USER_CREDENTIALS_KEYS = {"username", "password"}
