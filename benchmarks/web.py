"""Web console benchmark: server time per page with 100,000 scans in SQLite (goal: p95 <= 150 ms).

A SQLite database at this meddaemon's schema is filled in bulk with SYNTHETIC rows: ``--scans``
scans (busi, three labels each, registered over the last three days; 90% archived, 4% failed over
four reasons, the rest inferred, routed or waiting_model), a result per label (300,000 rows), a
heatmap row for each positive call, and a history of three or four steps per scan (no files behind
them: the pages are timed, not the pictures). Then the console (``create_app``, the read-only engine) serves
each page ``--repeats`` times in this process through Starlette's TestClient; the figure is the
server time the console itself reports in its ``Server-Timing`` header (routing, the read-only
session, the queries, the template), not the client's. Last, the overview's queries are timed
alone, with the share of its throughput counts (scans inferred per hour, on ``scan_events``).

    .venv/bin/python benchmarks/web.py                    # 100,000 scans, 60 requests per page: about a minute
    .venv/bin/python benchmarks/web.py --scans 1000000    # the million-row worklist (several minutes to fill)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
from sqlalchemy import Engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from meddaemon.config import load_settings  # noqa: E402
from meddaemon.daemon import bookkeeper  # noqa: E402
from meddaemon.db.engine import create_db_engine, session_factory, transaction  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.engine.heatmap_grid import grid_bytes  # noqa: E402
from meddaemon.engine.tasks import all_tasks  # noqa: E402
from meddaemon.web import queries  # noqa: E402
from meddaemon.web.app import create_app  # noqa: E402

LABELS = ("benign", "malignant", "normal")
REASONS = ("unroutable", "corrupt_image", "empty_file", "contract_mismatch")
#: every SYNTHETIC heatmap row's grid: a 7 x 7 map, as mobilenet_v2 and DenseNet-121 give for 224 x 224
GRID = grid_bytes(np.random.default_rng(0).random((7, 7)))


def fill(db: Path, scans: int, seed: int = 0) -> None:
    engine = create_db_engine(f"sqlite:///{db}")
    upgrade(engine)
    with transaction(session_factory(engine)) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    engine.dispose()
    rng = random.Random(seed)
    now = datetime.now(UTC)
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO model_versions (task_name, version, architecture, sha256, path, status, manifest, created_at) "
        "VALUES ('busi', 'v1', 'small_cnn', ?, '/synthetic', 'active', ?, ?)",
        ("0" * 64, '{"labels": ["benign", "malignant", "normal"], "kind": "multiclass"}', now.isoformat(" ")),
    )
    scan_rows, results, heatmaps, events = [], [], [], []
    result_id = 0
    for i in range(1, scans + 1):
        at = now - timedelta(seconds=rng.uniform(0, 3 * 86400) * (1 - i / scans))
        u = rng.random()
        state = (
            "archived" if u < 0.90 else "failed" if u < 0.94 else rng.choice(["inferred", "routed", "waiting_model"])
        )
        reason = rng.choice(REASONS) if state == "failed" else None
        stamp = at.strftime("%Y-%m-%d %H:%M:%S.%f")
        scan_rows.append((
            f"{rng.getrandbits(256):064x}", state, "busi", f"busi/synthetic_{i:07d}.png",
            f"/synthetic/failed/synthetic_{i:07d}.png" if state == "failed" else None,
            reason, "SYNTHETIC failure" if reason else None, stamp, stamp, f"1.2.826.0.1.3680043.8.498.{i // 3}",
        ))  # fmt: skip
        steps = ["registered", "routed", *(["inferred"] if state in ("archived", "inferred") else [])]
        steps += [state] if state not in steps else []
        events += [(i, step, stamp) for step in steps]
        if state in ("archived", "inferred"):
            p = [rng.random() for _ in LABELS]
            total = sum(p)
            top = max(range(3), key=lambda k: p[k])
            for k, label in enumerate(LABELS):
                result_id += 1
                results.append((i, 1, label, p[k] / total, 0.5, k == top, 40.0, stamp))
                if k == top:
                    heatmaps.append((result_id, "cam", GRID, f"/synthetic/{i}.jpg", 224, 224, stamp))
    with con:
        con.executemany(
            "INSERT INTO scans (sha256, state, task_name, source_name, stored_path, failure_reason, failure_message, "
            "registered_at, updated_at, study_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            scan_rows,
        )
        con.executemany(
            "INSERT INTO results (scan_id, model_version_id, label, probability, threshold, positive, latency_ms, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            results,
        )
        con.executemany(
            "INSERT INTO heatmaps (result_id, method, grid, overlay_path, height, width, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            heatmaps,
        )
        con.executemany("INSERT INTO scan_events (scan_id, state, at) VALUES (?, ?, ?)", events)
    con.execute("ANALYZE")
    con.close()


def throughput_share(reader: Engine, repeats: int) -> tuple[float, float, int]:
    """Median ms of the overview's queries, and of its throughput counts (scans inferred per hour) alone."""
    whole, alone, counts = [], [], []
    for _ in range(repeats):
        with Session(reader) as session:
            started = time.perf_counter()
            queries.overview(session)
            whole.append(time.perf_counter() - started)
            started = time.perf_counter()
            counts = queries.inferred_per_hour(session, queries.hour_starts(datetime.now(UTC), 12))
            alone.append(time.perf_counter() - started)
    return 1000 * statistics.median(whole), 1000 * statistics.median(alone), sum(h.count for h in counts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="meddaemon-web-bench-"))
    db = folder / "meddaemon.db"
    started = time.perf_counter()
    fill(db, args.scans)
    print(f"filled {args.scans:,} scans in {time.perf_counter() - started:.1f} s ({db.stat().st_size / 1e6:.0f} MB)")

    settings = load_settings(env={}, flags={"state_dir": folder, "watch": folder / "inbox"})
    app = create_app(settings)
    client = TestClient(app, base_url="http://127.0.0.1")
    rng = random.Random(1)
    middle = args.scans // 2
    some_sha = sqlite3.connect(db).execute("SELECT sha256 FROM scans WHERE id = ?", (middle,)).fetchone()[0]
    pages = {
        "overview": lambda: "/",
        "worklist, first page": lambda: "/worklist",
        "worklist, deep page (keyset)": lambda: f"/worklist?after={rng.randint(2, args.scans)}",
        "worklist, state=failed": lambda: "/worklist?state=failed",
        "worklist, failed deep page": lambda: f"/worklist?state=failed&after={rng.randint(2, args.scans)}",
        "worklist, label+call": lambda: "/worklist?label=malignant&call=positive",
        "worklist, date range": lambda: f"/worklist?since={(datetime.now(UTC) - timedelta(days=1)).date()}",
        "worklist, search name": lambda: f"/worklist?q=synthetic_{rng.randint(1, args.scans):07d}",
        "worklist, search SHA-256 prefix": lambda: f"/worklist?q={some_sha[:12]}",
        "scan page": lambda: f"/scans/{rng.randint(1, args.scans)}",
        "failures": lambda: "/failures",
    }
    load = os.getloadavg()[0]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.2f} before; "
          f"{args.repeats} requests per page after 3 warm-up")  # fmt: skip
    print(f"{'page':<34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, url in pages.items():
        for _ in range(3):
            client.get(url())
        times = []
        for _ in range(args.repeats):
            response = client.get(url())
            assert response.status_code == 200, (name, response.status_code)
            times.append(float(response.headers["server-timing"].split("dur=")[1]))
        print(f"{name:<34} {statistics.median(times):8.1f} {percentile(times, 0.95):8.1f} {max(times):8.1f}")
    overview_ms, inferred_ms, inferred = throughput_share(app.state.console.reader, args.repeats)
    print(f"overview queries {overview_ms:.1f} ms (median), of which the hourly inferred counts "
          f"{inferred_ms:.1f} ms ({inferred:,} scans inferred in the last 12 hours)")  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f} after")
    app.state.console.dispose()
    if args.keep:
        print(f"kept {db}")
    else:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
