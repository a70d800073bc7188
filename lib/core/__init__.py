"""Foundations every stage shares: errors, digests, the dtype table, typed options."""
