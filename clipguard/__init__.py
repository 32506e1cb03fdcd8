"""clipguard: find poisoned image-text pairs in WebDataset shards, and measure attacks and defences."""

import os as _os

# Spinning OpenMP threads are ruinous on small shared machines: five tiny training steps took
# 27.7 s with the default wait policy on 2 busy cores and 0.45 s with passive waiting. It must
# be set before torch starts its thread pool, so it is set on import of the package.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The public API, loaded on first use: `import clipguard` (and so `clipguard --help`) must not
# wait for torch, which the scoring functions need. `clipguard.audit` is a package of its own
# (run_audit, AuditConfig), loaded on first use like the rest; it needs numpy, scipy and pyarrow,
# never torch.
_PUBLIC = {
    "audit": "clipguard.audit",
    "read_signal": "clipguard.signals",
    "score_pairs": "clipguard.scoring.inmemory",
    "PairScores": "clipguard.scoring.inmemory",
    "score": "clipguard.api",
    "sample": "clipguard.api",
    "calibrate": "clipguard.api",
    "filter": "clipguard.api",
    "ModelSpec": "clipguard.model.loading",
    "ClipguardError": "clipguard.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clipguard' has no attribute {name!r}")
    import importlib

    loaded = importlib.import_module(module)
    value = loaded if module == f"{__name__}.{name}" else getattr(loaded, name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
