"""Getting messages out without loss: the on-disk outbox and the publisher that drains it."""
