"""One module per `tourguide` subcommand, each exposing `register(subparsers)`.

Modules here must import only argparse-level things at import time (no torch, no prefect), so
that `tourguide --help` and quick commands answer in about a second.
"""
