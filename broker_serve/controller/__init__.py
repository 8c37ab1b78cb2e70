"""The controller: the reconciler with its lease, the autoscaling policy, the REST API and
declarative configs. Nothing here is on the request path."""
