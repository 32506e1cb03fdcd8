"""The one gateway to open_clip: architectures, pretrained weights and local weight files.

Every way a user can name a model ends in the same place: an open_clip architecture built with
random weights, then a weights file loaded by our own safe loader (safetensors, or
``torch.load(weights_only=True)``, or a TorchScript archive for OpenAI's ``.pt`` files). Hub tags
are only a way to obtain such a file, so every loaded model has a file whose sha256 we record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from clipguard.errors import ModelLoadError
from clipguard.model import bundled
from clipguard.model.checkpoint import read_sidecar

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
HUB_HOST = ("huggingface.co", 443)
# Keys that OpenAI's TorchScript archives carry as buffers but open_clip's CLIP does not.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

_registered_dirs: set[str] = set()


def register_model_config(path: Path) -> str:
    """Register an open_clip model-config JSON (or a folder of them); return the architecture name.

    open_clip names an architecture after the file stem, so ``my-arch.json`` becomes ``my-arch``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model config {path} does not exist")
    if path.is_file():
        _validate_model_config(path)
    key = str(path.resolve())
    if key not in _registered_dirs:
        open_clip.add_model_config(path)
        _registered_dirs.add(key)
    return path.stem


def _validate_model_config(path: Path) -> None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model config {path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ModelLoadError(
            f"model config {path} lacks {', '.join(missing)}; it must follow open_clip's "
            "model_configs format (embed_dim, vision_cfg, text_cfg)"
        )


def register_builtin_configs() -> None:
    register_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. ``pretrained`` is a hub tag, a local file, or None for random."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    model_config: Path | None = None
    device: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class ModelInfo:
    """Everything a score file must record to be reproducible and comparable."""

    architecture: str
    pretrained: str | None
    weights_source: str  # "hub", "file", "bundled" or "random"
    weights_path: str | None
    weights_sha256: str | None
    precision: str
    device: str
    image_size: int
    context_length: int
    preprocess: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change scores; two runs with equal fingerprints give equal scores."""
        return {
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "preprocess": self.preprocess,
        }


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    info: ModelInfo
    spec: ModelSpec | None = None  # what it was loaded from, so another process can load it too


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    source: str
    quick_gelu: bool = False


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the architecture, load weights safely, and return the model ready for inference."""
    register_builtin_configs()
    _check_precision(spec.precision, spec.device)
    name, pretrained, source_hint = spec.name, spec.pretrained, None
    if spec.model_config is not None:
        name = register_model_config(spec.model_config)
        if pretrained == DEFAULT_PRETRAINED and not open_clip.list_pretrained_tags_by_model(name):
            # The default tag was not asked for: a custom architecture has no hub weights, and
            # the documented behaviour is random weights unless --pretrained names some.
            pretrained = None
    elif _is_checkpoint_path(name):
        name, pretrained, source_hint = _checkpoint_architecture(Path(name)), name, "file"
    elif bundled.is_bundled(name):
        bundle = bundled.resolve(name)
        name, pretrained, source_hint = bundle.architecture, str(bundle.weights), "bundled"
    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model architecture '{name}'. Use an open_clip name (e.g. ViT-B-32), a bundled "
            f"model ({', '.join(bundled.names())}), or --model-config FILE.json"
        )
    weights = resolve_weights(name, pretrained)
    if weights is not None and source_hint:
        weights = WeightsFile(weights.path, source_hint, weights.quick_gelu)
    model, preprocess = _build(name, weights, spec.device)
    if spec.precision != "fp32":
        # Weights cast once: on CPUs with AMX/AVX512-BF16, bf16 weights run about twice as fast as
        # fp32, while autocast re-casts weights every call and gains nothing (measured on ViT-B-32).
        model = model.to(_PRECISIONS[spec.precision])
    tokenizer = open_clip.get_tokenizer(name)
    info = ModelInfo(
        architecture=name,
        pretrained=pretrained,
        weights_source=weights.source if weights else "random",
        # Absolute, so a run started in another folder can load the recorded model again.
        weights_path=str(weights.path.absolute()) if weights else None,
        weights_sha256=sha256_file(weights.path) if weights else None,
        precision=spec.precision,
        device=spec.device,
        image_size=_image_size(model),
        context_length=int(getattr(model, "context_length", 77)),
        preprocess=_preprocess_description(model),
    )
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, info=info, spec=spec)


def _is_checkpoint_path(name: str) -> bool:
    return name.endswith((".safetensors", ".pt", ".pth", ".bin")) or Path(name).is_file()


def _checkpoint_architecture(path: Path) -> str:
    """A clipguard checkpoint names its architecture in a sidecar JSON (and may carry its config)."""
    if not path.is_file():
        raise ModelLoadError(f"model checkpoint {path} does not exist")
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise ModelLoadError(
            f"{path} has no clipguard sidecar ({path.with_suffix('.json').name}) naming its "
            "architecture; pass --model ARCH --pretrained FILE instead"
        )
    name = sidecar["architecture"]
    if name not in open_clip.list_models() and sidecar.get("model_config"):
        open_clip.add_model_config(_write_config_copy(name, sidecar["model_config"]))
    return name


def _write_config_copy(name: str, config: dict) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="clipguard-config-"))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def resolve_weights(name: str, pretrained: str | None) -> WeightsFile | None:
    """Turn a pretrained tag or path into a local file, downloading only when online."""
    if pretrained is None or pretrained == "" or pretrained.lower() == "none":
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsFile(path, "file", quick_gelu=_is_torchscript_archive(path))
    if os.sep in pretrained or path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}:
        raise ModelLoadError(f"weights file {pretrained} does not exist")
    return _download_hub_weights(name, pretrained)


def _download_hub_weights(name: str, tag: str) -> WeightsFile:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none"
        raise ModelLoadError(
            f"'{tag}' is neither a file nor a pretrained tag of {name} (known tags: {known})"
        )
    cfg = open_clip.get_pretrained_cfg(name, tag)
    offline_hint = (
        f"could not obtain pretrained weights {name}/{tag}: this machine is offline. Pass a local "
        "weights file with --pretrained PATH (.safetensors, .pt, .bin or an OpenAI .pt archive), "
        "or use a bundled model: --model " + " / --model ".join(bundled.names())
    )
    if not _hub_cached(cfg) and not _hub_reachable():
        raise ModelLoadError(offline_hint)
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network stacks raise many types; all mean the same to the user
        raise ModelLoadError(f"{offline_hint} ({type(exc).__name__}: {exc})") from exc
    if not path:
        raise ModelLoadError(offline_hint)
    return WeightsFile(Path(path), "hub", quick_gelu=bool(cfg.get("quick_gelu", False)))


def _hub_cached(cfg: dict) -> bool:
    """True when the hub file is already in the local cache, so no network is needed."""
    hub_id = cfg.get("hf_hub", "")
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    # open_clip writes hub entries as 'org/repo/' or 'org/repo/filename'.
    repo_id, filename = os.path.split(hub_id)
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Offline machines would otherwise spend ~50 s in hub retries before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


class _NoRandomInitWarning(logging.Filter):
    # open_clip warns "initialized randomly" because we load the weights ourselves, after it.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _build(name: str, weights: WeightsFile | None, device: str):
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, device="cpu", force_quick_gelu=bool(weights and weights.quick_gelu)
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    if weights is not None:
        state_dict = read_state_dict(weights.path)
        _load_into(model, state_dict, weights.path)
    model = model.to(device).eval()
    return model, preprocess


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without ever unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
    if _is_torchscript_archive(path):
        # OpenAI's CLIP .pt files are TorchScript archives; jit.load rebuilds tensors and code
        # from the archive's own restricted format, not from arbitrary pickled classes.
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path} looks like a TorchScript archive but failed: {exc}") from exc
        state_dict = dict(archive.state_dict())
        for key in _OPENAI_EXTRA_KEYS:
            state_dict.pop(key, None)
        return state_dict
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path} could not be loaded with weights_only=True ({exc}). clipguard never unpickles "
            "arbitrary objects: convert it to .safetensors or a plain state dict."
        ) from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelLoadError(f"{path} holds no state dict")
    return {_strip_module_prefix(k): v for k, v in checkpoint.items()}


def _strip_module_prefix(key: str) -> str:
    # DistributedDataParallel training checkpoints prefix every key with "module.".
    return key[len("module."):] if key.startswith("module.") else key


def _load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != own["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(own["logit_scale"].shape)
    state_dict = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        )
        raise ModelLoadError(f"weights in {path} do not fit this architecture ({detail}). Check --model.")
    model.load_state_dict(state_dict, strict=True)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/code/") or "/code/" in name for name in archive.namelist())


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _preprocess_description(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()}


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_precision(precision: str, device: str) -> None:
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision '{precision}'; use one of {', '.join(_PRECISIONS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def precision_dtype(precision: str) -> torch.dtype:
    return _PRECISIONS[precision]
