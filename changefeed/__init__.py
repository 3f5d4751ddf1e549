"""The change feed: an append-only log of instance creates, updates and deletes, and its consumers."""
