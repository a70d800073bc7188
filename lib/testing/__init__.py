"""Fixtures and synthetic data: tiny models, synthetic captures, random exact transforms."""
