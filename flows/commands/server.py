"""`tourguide server start|stop|status`: a persistent local Prefect server that later commands use."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server", help="start, stop or show a persistent local Prefect server (makes every later command fast)",
        description="Runs `prefect server start` on 127.0.0.1 in the background, with its pid file "
                    "(tourguide-server.json) and log (tourguide-server.log) under the Prefect home (PREFECT_HOME, "
                    "default ~/.prefect). While it runs, every tourguide command uses it (unless PREFECT_API_URL is "
                    "set) instead of starting a throwaway API, and its runs show in the UI at http://127.0.0.1:PORT. "
                    "SQLite under the Prefect home by default; PostgreSQL when PREFECT_API_DATABASE_CONNECTION_URL "
                    "is set. start and stop are idempotent; status exits 0 when a server answers, 1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (start only)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds to wait for /api/ready (a first start migrates the database)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store import server

    if args.action == "start":
        st = server.start(port=args.port, timeout=args.timeout)
        if st["already"]:
            print(f"Prefect server already running at {st['url']} (pid {st['pid']}; log {st['log']})")
        else:
            print(f"Prefect server running at {st['url']} after {st['seconds']} s (pid {st['pid']}, database "
                  f"{st['database']}, log {st['log']}). UI: {st['url'][:-4]}. Later tourguide commands use it; "
                  "`tourguide server stop` stops it.")
        return 0
    if args.action == "stop":
        st = server.stop()
        if st["state"] == "stale":
            print(f"no Prefect server was running; removed a stale pid file (pid {st.get('pid')} is gone)")
        elif st["state"] == "stopped":
            print(f"no Prefect server was running (no pid file under {server.prefect_home()})")
        else:
            print(f"stopped the Prefect server at {st['url']} (pid {st['pid']})")
        return 0
    st = server.status()
    if st["state"] == "running":
        print(f"running at {st['url']} (pid {st['pid']}, since {st['started']}, database {st['database']}, "
              f"log {st['log']})")
        return 0
    if st["state"] == "not answering":
        print(f"pid {st['pid']} is alive but {st['url']}/ready does not answer (starting, or stuck: see {st['log']}; "
              "`tourguide server stop` ends it)")
        return 1
    extra = f"; removed a stale pid file (pid {st.get('pid')} is gone)" if st["state"] == "stale" else ""
    print(f"no Prefect server running (Prefect home {server.prefect_home()}){extra}. "
          "`tourguide server start` starts one.")
    return 1
