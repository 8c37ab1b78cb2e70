"""AMQP: the connection and its channels, publishing, consuming, acks, and cancellation broadcasts."""
