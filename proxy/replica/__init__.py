"""Reads answered locally: the consistency gate, the result cache, answers from replicas,
micro-batched searches, the router that keeps the replicas, and export mode's write overlay."""
