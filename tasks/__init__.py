"""Thin Prefect tasks: one lib call each, paths and digests in, small manifests out."""
