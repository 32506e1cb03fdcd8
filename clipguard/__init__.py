"""clipguard: find poisoned image-text pairs in WebDataset shards, and measure attacks and defences."""

__version__ = "0.1.0"
