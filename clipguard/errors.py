"""Errors users can act on. The CLI turns these into a red message and exit code 2."""


class ClipguardError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ShardSpecError(ClipguardError):
    """A shard path, pattern or URL that cannot be resolved."""


class ModelLoadError(ClipguardError):
    """A model name, pretrained tag or weights file that cannot be loaded."""


class CalibrationError(ClipguardError):
    """A labelled sample, sample design or threshold target that cannot give a calibrated gamma."""


class NoLabelledSampleError(CalibrationError):
    """No labelled pairs (or none in a stratum the estimate needs)."""


class OneClassLabelsError(CalibrationError):
    """All labels are clean (or all poison), so recall or the false-positive rate cannot be estimated."""


class UnreachableTargetError(CalibrationError):
    """No threshold meets the requested false-positive rate or recall with the evidence at hand."""


class MixedModelsError(ClipguardError):
    """A score folder (or a set of score files) holds scores from more than one model."""


class StorageError(ClipguardError):
    """An output folder (local or object store) that cannot be read or written: no credentials,
    no right to write, a missing backend, or a store that kept failing after retries."""
