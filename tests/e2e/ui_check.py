"""The UI check from nothing: a fresh server with its UI, a run with a wide QA history and its
real report flow (tests/e2e/ui_fixture.py), then headless Chromium over the pages users open
(tests/e2e/ui_check.mjs): the report in both UIs (figures load, nothing runs under the side panel
or off the page), a wide table artifact, the report's flow run, the Artifacts page (the keys).

    python tests/e2e/ui_check.py [--out DIR]       # exit 0: every page passed; DIR keeps the screenshots

Needs node, chromium (apt-get install -y chromium) and playwright-core
(`npm install --prefix tests/e2e`, no browser download). `missing()` says what is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.e2e.harness import ROOT, prefect_server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def missing() -> str | None:
    """Why the check cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node is not installed (apt-get install -y nodejs)"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium, or set CHROMIUM)"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (npm install --prefix tests/e2e)"
    return None


def pages(fixture: dict) -> list[dict]:
    arts, run_id = fixture["artifacts"], fixture["run_id"]
    report, table = arts[f"qa-report-{run_id}"], arts[f"qa-layers-hidden-state-cosine-{run_id}"]
    ready = ["Per-layer metrics", "Checkpoints"]
    return [
        {"name": "v1-report", "path": f"/artifacts/artifact/{report}", "ready": ready, "images": True},
        {"name": "v2-report", "path": f"/v2/artifacts/artifact/{report}", "ready": ready, "images": True},
        {"name": "v1-table", "path": f"/artifacts/artifact/{table}", "ready": ["model.layers.0"]},
        {"name": "v2-table", "path": f"/v2/artifacts/artifact/{table}", "ready": ["model.layers.0"]},
        {"name": "v1-flow-run", "path": f"/runs/flow-run/{fixture['flow_run_id']}", "ready": [fixture["flow_run_name"]]},
        {"name": "v1-artifacts", "path": "/artifacts", "ready": [f"qa-report-{run_id}"]},
        {"name": "v1-rotations", "path": f"/artifacts/artifact/{fixture['rotations']}", "ready": ["L23"]},
        {"name": "v2-rotations", "path": f"/v2/artifacts/artifact/{fixture['rotations']}", "ready": ["L23"]},
        # negative controls: the check must flag these (a broken image; a table under the side panel)
        {"name": "v1-control", "path": f"/artifacts/artifact/{fixture['control']}", "ready": ["layer_15_metric"],
         "images": True, "expect_problems": True},
        {"name": "v2-control", "path": f"/v2/artifacts/artifact/{fixture['control']}", "ready": ["layer_15_metric"],
         "images": True, "expect_problems": True},
    ]


def run_check(out: Path, run_id: str = "ui-check") -> tuple[int, dict]:
    """Returns (node's exit code, {"fixture", "results", "seconds": {...}})."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tourguide-ui-") as tmp, prefect_server(Path(tmp), ui=True) as (url, env):
        t1 = time.perf_counter()
        env = {**env, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "WARNING"}
        made = subprocess.run([sys.executable, str(HERE / "ui_fixture.py"), str(Path(tmp) / "runs"), run_id], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        if made.returncode != 0:
            raise RuntimeError(f"ui_fixture.py failed:\n{made.stdout[-2000:]}\n{made.stderr[-4000:]}")
        fixture = {**json.loads(made.stdout.strip().splitlines()[-1]), "run_id": run_id}
        t2 = time.perf_counter()
        spec = out / "spec.json"
        spec.write_text(json.dumps({"pages": pages(fixture)}, indent=2))
        base = url.removesuffix("/api")
        node = subprocess.run(["node", str(HERE / "ui_check.mjs"), base, str(spec), str(out)], cwd=HERE,
                              capture_output=True, text=True, timeout=300)
        t3 = time.perf_counter()
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    print(node.stdout + node.stderr[-2000:], end="")
    seconds = {"server": round(t1 - t0, 1), "fixture": round(t2 - t1, 1), "browser": round(t3 - t2, 1),
               "total": round(time.perf_counter() - t0, 1)}
    print(f"ui check: server {seconds['server']} s, run + report {seconds['fixture']} s, "
          f"browser {seconds['browser']} s, total {seconds['total']} s; screenshots in {out}")
    return node.returncode, {"fixture": fixture, "results": results, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ui-check-out", help="folder for screenshots and results.json")
    args = ap.parse_args()
    why = missing()
    if why:
        print(f"ui check skipped: {why}", file=sys.stderr)
        return 2
    code, _ = run_check(Path(args.out).resolve())
    return code


if __name__ == "__main__":
    sys.exit(main())
