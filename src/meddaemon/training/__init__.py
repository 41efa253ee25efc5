"""Retraining (docs/design.md section 5): synthetic phantoms in each dataset's published layout, adapters
that read those layouts as published, near-duplicate detection and leak-free splits."""

#: ``--seed`` (of the split, the weights and the order) runs from 0 to this, numpy's legacy seed range
MAX_SEED = 2**32 - 1
