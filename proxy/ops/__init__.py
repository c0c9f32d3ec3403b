"""Running it: the admin API, metrics, worker processes and their shared ledger."""
