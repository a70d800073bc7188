"""deployments/server.sh against the local PostgreSQL: a fresh database is created, the server
answers /api/ready and stores flow runs there (not in SQLite), and the database is dropped after.
--split (API and services as two processes, Redis messaging) serves the same API."""

from __future__ import annotations

import asyncio

import pytest

from tests.scale import stack


def _count_flow_runs(db: str) -> int:
    import asyncpg

    async def go() -> int:
        conn = await asyncpg.connect(f"{stack.PG}/{db}", timeout=10)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM flow_run"))
        finally:
            await conn.close()

    return asyncio.run(go())


def _make_run(url: str) -> None:
    from prefect import flow

    from tests.e2e.test_server import client_call

    @flow(name="stack-check")
    def check() -> None: ...

    async def go(client):
        return await client.create_flow_run(check, name="stack-check-run")

    client_call(url, go)


@pytest.mark.slow
# The one-process server is exercised end to end by tests/scale/test_e2e_scale.py; here only the
# split one (a second start costs ~60 s of CI on two cores).
@pytest.mark.parametrize("split", [True], ids=["split-redis"])
def test_server_uses_its_own_postgres_database_and_drops_it(tmp_path, split, monkeypatch):
    seen = {}
    real_drop = stack.drop_database

    def spy_drop(name):  # count the rows just before the real drop
        seen["db"] = name
        seen["runs"] = _count_flow_runs(name)
        real_drop(name)

    monkeypatch.setattr(stack, "drop_database", spy_drop)
    with stack.pg_server(tmp_path, split=split) as (url, env):
        _make_run(url)
        assert not (tmp_path / "prefect-home" / "prefect.db").exists(), "server fell back to SQLite"
    assert seen["runs"] == 1, seen
    assert not stack.database_exists(seen["db"])
