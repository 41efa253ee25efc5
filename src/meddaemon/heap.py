"""The garbage collector and the heap torch and the standard's tables leave behind.

Importing torch and torchvision (torchvision's ops import ``torch._dynamo``), loading a model and
highdicom's tables of the standard make hundreds of thousands of long-lived containers. Python's
cyclic collector walks all of them at every full collection (0.15 to 0.4 s each on a small machine),
and again while the interpreter shuts down: 1.3 s after torch and torchvision, against 0.3 s with
the heap frozen first (measured in ``benchmarks/README.md``, issue 16).
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect what is garbage now, then move what is left out of the collector's sight for good:
    once per process, where the heap has taken its lasting shape (the report process, after its
    first DICOM objects). What is frozen is never freed, which is what long-lived module data wants."""
    gc.collect()
    gc.freeze()


def freeze_for_exit() -> None:
    """Freeze the whole heap just before the process exits: the interpreter's shutdown then frees
    the modules without walking them in full collections (1.3 s to 0.3 s after torch and
    torchvision)."""
    gc.freeze()
