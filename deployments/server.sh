#!/usr/bin/env bash
# A Prefect server backed by PostgreSQL, for several workers or hosts (SQLite, the default of a plain
# server start, is for one person on one machine). Creates the database if missing.
#
# Usage: bash deployments/server.sh [--db NAME] [--port PORT] [--split] [--redis URL]
#   --db     database name (default: prefect; env TOURGUIDE_PG_DB)
#   --port   API/UI port on 127.0.0.1 (default: 4200)
#   --split  run the API (server start --no-services) and the background services
#            (`prefect server services start`) as two processes; events then travel through Redis
#            (prefect-redis), without which a split server silently loses them
#   --redis  Redis URL for --split (default: redis://127.0.0.1:6379/0; env TOURGUIDE_REDIS_URL)
# PostgreSQL: TOURGUIDE_PG (default postgresql://postgres@127.0.0.1:5432), a DSN without database.
# Then: export PREFECT_API_URL=http://127.0.0.1:PORT/api; bash deployments/setup_pools.sh N_GPUS
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
PY="${PY:-.venv/bin/python}"
PG="${TOURGUIDE_PG:-postgresql://postgres@127.0.0.1:5432}"
DB="${TOURGUIDE_PG_DB:-prefect}"
PORT=4200
SPLIT=0
REDIS="${TOURGUIDE_REDIS_URL:-redis://127.0.0.1:6379/0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --db) DB="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --split) SPLIT=1; shift ;;
    --redis) REDIS="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$DB" =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]]; then
  echo "server.sh: database name '$DB' must be letters, digits and _ (not starting with a digit)" >&2; exit 2
fi
# Create the database when missing (asyncpg ships with Prefect, so no psql client is needed).
"$PY" - "$PG" "$DB" <<'PYEOF'
import asyncio, sys
import asyncpg

async def main(dsn: str, db: str) -> None:
    try:
        conn = await asyncpg.connect(dsn + "/postgres", timeout=10)
    except (OSError, asyncpg.PostgresError) as e:
        sys.exit(f"server.sh: cannot reach PostgreSQL at {dsn} ({e}); start it (see README 'Scaling out') "
                 "or point TOURGUIDE_PG at it")
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
            await conn.execute(f'CREATE DATABASE "{db}"')
            print(f"server.sh: created database {db}", file=sys.stderr)
    finally:
        await conn.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
PYEOF
export PREFECT_API_DATABASE_CONNECTION_URL="${PG/postgresql:/postgresql+asyncpg:}/$DB"
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true
unset PREFECT_API_URL  # the server must not talk to another one
if [ "$SPLIT" = 0 ]; then
  exec "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
fi
# Split: the settings of Prefect's "How to scale self-hosted Prefect" (prefect-redis).
export PREFECT_MESSAGING_BROKER=prefect_redis.messaging PREFECT_MESSAGING_CACHE=prefect_redis.messaging
export PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=prefect_redis.ordering
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage
export PREFECT_REDIS_MESSAGING_URL="$REDIS" PREFECT_SERVER_DOCKET_URL="$REDIS"
# Migrate once, before two processes race to do it.
"$PREFECT" --no-prompt server database upgrade -y >/dev/null
export PREFECT_API_DATABASE_MIGRATE_ON_START=false
"$PREFECT" server services start &
services=$!
trap 'kill "$services" 2>/dev/null; wait "$services" 2>/dev/null' EXIT INT TERM
"$PREFECT" server start --host 127.0.0.1 --port "$PORT" --no-services
