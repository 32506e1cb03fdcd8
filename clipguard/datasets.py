"""Dataset names -> shard specs, from a small user config file.

Users sterilize with the same clean sets again and again (the paper uses Visual Genome), so
`--clean vg` reads this file instead of a long brace pattern:

    # ~/.config/clipguard/datasets.toml   (or the file named by $CLIPGUARD_DATASETS)
    [datasets]
    vg = "/data/vg/{00000..00099}.tar"
    cc3m-sample = ["/data/cc3m/a", "https://example.org/cc3m/{000..009}.tar"]

A value that already resolves as shards (a folder, file, glob, brace pattern or URL) is used as is.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from clipguard.data.shardspec import REMOTE_SCHEMES, resolve_shards
from clipguard.errors import ClipguardError, ShardSpecError

ENV_VAR = "CLIPGUARD_DATASETS"


class DatasetNameError(ClipguardError):
    """A dataset name that no config file defines."""


def default_config_path() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "clipguard" / "datasets.toml"


def load_dataset_names(config_path: Path | None = None) -> dict[str, list[str]]:
    path = Path(config_path) if config_path else default_config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise DatasetNameError(f"dataset config {path} is not valid TOML: {exc}") from exc
    table = data.get("datasets", {})
    if not isinstance(table, dict):
        raise DatasetNameError(f"dataset config {path}: [datasets] must be a table of name = shard spec(s)")
    names = {}
    for name, value in table.items():
        specs = [value] if isinstance(value, str) else value
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise DatasetNameError(f"dataset config {path}: '{name}' must be a string or a list of strings")
        names[name] = specs
    return names


def resolve_dataset(specs: list[str], config_path: Path | None = None) -> list[str]:
    """Each item is a shard spec, or a dataset name from the config file; returns shard specs."""
    names = None
    resolved: list[str] = []
    for spec in specs:
        if _looks_like_shards(spec):
            resolved.append(spec)
            continue
        names = names if names is not None else load_dataset_names(config_path)
        if spec not in names:
            path = Path(config_path) if config_path else default_config_path()
            known = ", ".join(sorted(names)) or f"none (no datasets defined in {path})"
            raise DatasetNameError(
                f"'{spec}' is neither shards nor a known dataset name. Known names: {known}. "
                f"Define names in {path} under [datasets], e.g. {spec} = \"/data/{spec}/{{00000..00099}}.tar\""
            )
        resolved.extend(names[spec])
    return resolved


def _looks_like_shards(spec: str) -> bool:
    if spec.startswith(REMOTE_SCHEMES) or spec.startswith(("pipe:", "file://")) or "/" in spec or "{" in spec:
        return True
    try:
        resolve_shards([spec])
        return True
    except ShardSpecError:
        return False
