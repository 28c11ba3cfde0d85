"""Upper bounds beyond which a setting means nothing; the config's keys and the CLI's flags share them.

A value past its bound is refused with one line naming the key or flag (docs: README, "Configs").
"""

from __future__ import annotations

__all__ = [
    "MAX_BATCH", "MAX_CLASS_ID", "MAX_COMPONENTS", "MAX_EPOCHS", "MAX_IMAGES", "MAX_LR", "MAX_RANDOM_SETS",
    "MAX_RESAMPLES", "MAX_SEED", "MAX_SHOWN", "MAX_SIDE", "MAX_TRAIN_STEPS", "MAX_WORKERS", "MAX_DECODE_WORKERS",
]

MAX_SEED = 2**32 - 1  #: seeds are 0 … 2³² − 1 (numpy's range)
MAX_SIDE = 4096  #: a grid or input side, in cells or pixels
MAX_BATCH = 65_536  #: images or pixels per batch
MAX_COMPONENTS = 4096  #: NMF components (NCAVs) per layer
MAX_EPOCHS = 10_000  #: training epochs of a probe or control probe
MAX_LR = 10.0  #: learning rate
MAX_RESAMPLES = 1_000_000  #: bootstrap resamples and permutations
MAX_IMAGES = 1_000_000  #: images per TCAV set and inputs scored
MAX_RANDOM_SETS = 1000  #: random sets (R(R − 1)/2 null CAVs)
MAX_SHOWN = 1000  #: report examples and prototypes, concepts shown by ``maps --top``
MAX_CLASS_ID = 1_000_000  #: class ids in target specs
MAX_TRAIN_STEPS = 1_000_000  #: ``train-zoo --steps``
MAX_WORKERS = 4096  #: Ray workers (``execution.workers``, ``--workers``)
MAX_DECODE_WORKERS = 64  #: decode threads (``embed.decode_workers``, ``--decode-workers``); the library's own bound, kept equal by a test
