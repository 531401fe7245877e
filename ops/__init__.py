"""Operators' tools: recovery (recomputing windows, replaying the DLQ)."""
