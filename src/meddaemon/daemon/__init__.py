"""The daemon: one loop (``service.Daemon.run``) turning a list of stages.

Each stage owns one part of the work and the rows or files it claims for it, under this daemon's
id (``lease.py``: a daemon declared lost loses its claims to the others). The interface is
``stages.Stage``: ``start``, ``recover``, ``tick(now, flush)``, ``next_deadline``, ``idle``,
``look_again``, ``finish``, ``drain``, ``close``. The loop keeps what they share: the database
through the outage guard (``outage.py``), the lease and its heartbeats, the decoding workers
(``workers.py``), the moves of files (commit, move, mark done: ``bookkeeper.py``, ``filing.py``),
signals and the stop request, and the wait for file events between turns.

The stages, in the order they turn (``Daemon._stages``):

=========  =====================  ============================================================
metrics    metrics.py             the Prometheus endpoint (``metrics_port``; not ``--once``)
models     serving.py             the active version of each task, polled and loaded in the background
receiver   receiver_stage.py      the DICOM C-STORE SCP (``dicom_port``; not ``--once``), in a child process
watcher    watcher.py             filesystem events as hints (not ``--once``: rescans find the files)
intake     intake_stage.py        inbox files: stable, claimed, read in the workers, recorded, moved
inference  inference.py           batches in a forward thread; results and heatmaps stored
reports    reporter.py            PDF reports, in a child process (``--once``: after the drain)
outbox     outbox_stage.py        DICOM results to the destinations, in a child process
archive    archiving.py           reported scans from work/ to archive/
=========  =====================  ============================================================

A new stage is a module with a ``Stage`` subclass and one line in ``Daemon._stages``, as the DICOM
receiver was: it writes each instance durably into the inbox and the intake takes it from there.
"""
