"""Prefect flows (recipes over tasks) and the `tourguide` command line."""
