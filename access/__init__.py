"""Access control: authentication (JWTs, API tokens), roles per data partition, audit log, data requests."""
