"""Dataset names -> shard specs, from a small user config file.

Users sterilize with the same clean sets again and again (the paper uses Visual Genome), so
`--clean vg` reads this file instead of a long brace pattern:

    # ~/.config/clipguard/datasets.toml   (or the file named by $CLIPGUARD_DATASETS)
    [datasets]
    vg = "/data/vg/{00000..00099}.tar"
    cc3m-sample = ["/data/cc3m/a", "https://example.org/cc3m/{000..009}.tar"]

A value that already resolves as shards (a folder, file, glob, brace pattern or URL) is used as is.
`clipguard convert` writes its names here with ``register_dataset``.
"""

from __future__ import annotations

import json
import os
import re
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


_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_DATASETS_HEADER = re.compile(r"^\s*\[\s*datasets\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def register_dataset(name: str, specs: list[str], config_path: Path | None = None) -> Path:
    """Set ``name = specs`` under [datasets] in the config file (created if absent); returns its path.

    The file is edited line by line rather than rewritten, so a user's comments and other names
    survive; the result is parsed back before it replaces the old file, atomically.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise DatasetNameError(f"dataset name {name!r} may only hold letters, digits, '-' and '_'")
    path = Path(config_path) if config_path else default_config_path()
    text = path.read_text() if path.is_file() else ""
    load_dataset_names(path)  # refuse to edit a file that is already broken
    value = json.dumps(specs[0], ensure_ascii=False) if len(specs) == 1 else \
        "[" + ", ".join(json.dumps(s, ensure_ascii=False) for s in specs) + "]"
    lines = _with_entry(text.splitlines(), name, f"{name} = {value}")
    new_text = "\n".join(lines) + "\n"
    try:
        written = tomllib.loads(new_text).get("datasets", {}).get(name)
    except tomllib.TOMLDecodeError as exc:
        raise DatasetNameError(f"could not add {name!r} to {path} without breaking it ({exc}); edit it by hand") from exc
    if written not in (specs, specs[0] if len(specs) == 1 else None):
        raise DatasetNameError(f"could not add {name!r} to {path} (it defines {name} elsewhere?); edit it by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(new_text)
    os.replace(temporary, path)
    return path


def _with_entry(lines: list[str], name: str, entry: str) -> list[str]:
    key = re.compile(rf"""^\s*(?:{re.escape(name)}|"{re.escape(name)}"|'{re.escape(name)}')\s*=""")
    in_datasets, header, start = False, None, None
    for index, line in enumerate(lines):
        if _ANY_HEADER.match(line) and not line.strip().startswith(("[[",)) and "=" not in line.split("#")[0]:
            in_datasets = bool(_DATASETS_HEADER.match(line))
            header = index if in_datasets else header
        elif in_datasets and key.match(line):
            start = index
            break
    if start is not None:
        end = start
        # A list value may span lines: the entry ends at the first line where it parses.
        for end in range(start, len(lines)):
            try:
                tomllib.loads("\n".join(lines[start:end + 1]))
                break
            except tomllib.TOMLDecodeError:
                continue
        return lines[:start] + [entry] + lines[end + 1:]
    if header is not None:
        return lines[:header + 1] + [entry] + lines[header + 1:]
    return lines + ([""] if lines and lines[-1].strip() else []) + ["[datasets]", entry]
