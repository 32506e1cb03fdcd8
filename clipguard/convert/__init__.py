"""Datasets in their official on-disk formats (COCO, Flickr30k, Visual Genome, a folder of
image + .txt pairs) -> WebDataset shards that every clipguard command reads.

One module per dataset parses annotations into ``SourcePair``s; ``pipeline.convert_dataset``
reads and validates each image, labels captions by keyword, writes shards (``writer``), the
``convert_manifest.json`` and the dataset's name in the registry (``clipguard.datasets``).
"""

from clipguard.convert.pipeline import (
    MANIFEST_NAME,
    ConvertConfig,
    ConvertResult,
    DatasetKind,
    Failure,
    Registration,
    convert_dataset,
)
from clipguard.convert.sources import CaptionChoice, ConvertError, SourcePair

__all__ = [
    "MANIFEST_NAME", "CaptionChoice", "ConvertConfig", "ConvertError", "ConvertResult", "DatasetKind",
    "Failure", "Registration", "SourcePair", "convert_dataset",
]
