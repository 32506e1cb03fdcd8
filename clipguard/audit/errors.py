"""The audit's input errors, raised by the driver and by per-part tasks alike."""

from clipguard.errors import ClipguardError


class AuditInputError(ClipguardError):
    """A score folder or embedding folder an audit cannot use."""


class MissingEmbeddingsError(AuditInputError):
    """No embeddings beside the scores (or in the folder given)."""
