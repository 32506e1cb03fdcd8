"""clipguard: find poisoned image-text pairs in WebDataset shards, and measure attacks and defences."""

import os

# Spinning OpenMP threads are ruinous on small shared machines: five tiny training steps took
# 27.7 s with the default wait policy on 2 busy cores and 0.45 s with passive waiting. It must
# be set before torch starts its thread pool, so it is set on import of the package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
