"""The primary: the pooled upstream connection, forwarding, and the embedded primary with
its sample data."""
