"""A replica process and what runs inside it: request execution, response encoding, and the
decorators whose state lives in replicas (`serve.ingress`, `@serve.batch`, `@serve.multiplexed`)."""
