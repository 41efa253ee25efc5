"""PDF reports (docs/design.md section 7): per scan, per study, and a summary of a period.

``content`` gathers what a report says from the database, ``render`` and ``summary`` lay it out
with reportlab following the per-task wording of ``templates``, ``output`` writes it atomically and
records it. The daemon's report stage is ``meddaemon.daemon.reporter``.
"""
