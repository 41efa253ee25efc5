"""Batch evaluation in place (docs/design.md section 14): a cohort read where it lies, scored by a
model version, stored as scans and results the audit reads; on this machine or on a Ray cluster."""
