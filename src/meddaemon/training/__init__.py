"""Retraining (docs/design.md section 5): synthetic phantoms in each dataset's published layout, adapters
that read those layouts as published, near-duplicate detection and leak-free splits."""
