"""Local testing mode: `serve.run(app, _local_testing_mode=True)` runs every deployment of an
application in the calling process, with no RabbitMQ, Redis or other process
(docs/architecture.md, "Local testing mode")."""
