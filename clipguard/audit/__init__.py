"""`clipguard audit`: cross-pair signals over a whole scored set, and the attack goals they reveal.

inputs (scores + clip-retrieval embeddings) -> neighbours (exact or faiss) -> grouping (exact and
near-duplicate images and captions) -> classes (keyword caption class, data-driven image class,
background cells) -> density -> detect (findings with corrected p-values) -> output. How it
scales to 10^8 pairs: `clipguard.audit.pipeline`.
"""

from clipguard.audit.detect import DetectConfig, Finding
from clipguard.audit.inputs import AuditInputError, MissingEmbeddingsError
from clipguard.audit.neighbours import MissingFaissError
from clipguard.audit.pipeline import AuditConfig, AuditResult, run_audit

__all__ = ["AuditConfig", "AuditInputError", "AuditResult", "DetectConfig", "Finding", "MissingEmbeddingsError",
           "MissingFaissError", "run_audit"]
