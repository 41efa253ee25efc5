"""The database's clock, in seconds since the epoch: the one clock every daemon agrees on.

Leases compare heartbeats with this clock, never with a node's own, so a node whose clock is off by
an hour neither steals a live daemon's work nor keeps a dead one's. It is a SQL expression, evaluated
by the server in the statement that uses it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement


class db_clock(FunctionElement[float]):
    """``db_clock()``: now, by the database server, as float seconds since the Unix epoch."""

    type = Float()
    inherit_cache = True


@compiles(db_clock, "postgresql")
def _postgresql(element: db_clock, compiler: Any, **kw: Any) -> str:
    # clock_timestamp(), not now(): now() stands still for the whole transaction
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_clock, "sqlite")
def _sqlite(element: db_clock, compiler: Any, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def read_db_clock(session: Session) -> float:
    return float(session.scalar(select(db_clock())))  # type: ignore[arg-type]
