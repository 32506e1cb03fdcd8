"""Contrastive fine-tuning of any model ``load_model`` can load (the victim's training, §4.1).

One step: a batch of pairs -> both towers -> symmetric InfoNCE with the model's learned
temperature (open_clip's ``ClipLoss``; ``SigLipLoss`` for models with a logit bias) -> AdamW ->
the temperature clamped to 100 as CLIP does. A run ends after ``epochs`` passes over the shards or
``max_steps`` steps, or early when ``should_stop`` says so; an early stop leaves a resume state.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel

import clipguard
from clipguard.data.shardspec import Shard, resolve_shards
from clipguard.model.checkpoint import read_sidecar, save_checkpoint
from clipguard.model.encoding import encode_text_trimmed, supports_trimmed_text
from clipguard.model.loading import LoadedModel, ModelSpec, load_model, read_state_dict, sha256_file
from clipguard.training.config import (
    RESUMABLE_DIFFERENCES,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    TrainProgress,
)
from clipguard.training.optim import (
    TrainableParameters,
    build_optimizer,
    learning_rate,
    select_parameters,
    set_learning_rate,
)
from clipguard.training.state import (
    ResumeState,
    RunPosition,
    load_resume_state,
    restore_optimizer,
    resume_state_path,
    save_resume_state,
)
from clipguard.training.stream import TrainPairs, batches, chunk_loader, count_raw_samples

ProgressCallback = Callable[[TrainProgress], None]
# Weights and optimizer moments stay fp32; lower precision is autocast around the forward pass.
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARDS_LISTED = 100  # in the sidecar; the sha256 of the full list (one address a line) pins the rest


def finetune(
    model: ModelSpec | LoadedModel,
    shards: list[str] | list[Shard] | str,
    config: FinetuneConfig,
    out_path: Path | str,
    progress_callback: ProgressCallback | None = None,
    resume_from: Path | str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on the pairs in ``shards`` and write ``out_path`` (a checkpoint that
    ``load_model`` reads by path alone). A LoadedModel is trained in place.

    ``resume_from`` continues an incomplete run from its checkpoint: same starting model, data and
    settings (``save_every`` aside), and the result is the same as an uninterrupted run's on CPU.
    ``should_stop`` is asked after every step; True ends the run there, resumable.
    """
    config.validate()
    loaded = _trainable_model(model)
    shard_list = _as_shards(shards)
    out_path = _checkpoint_path(out_path)
    identity = run_identity(loaded, shard_list, config)
    resume = _open_resume(Path(resume_from), loaded, identity) if resume_from is not None else None
    if resume is not None:
        identity["start_model"] = resume.identity["start_model"]

    torch.manual_seed(config.seed)  # only models with dropout draw random numbers while training
    parameters = select_parameters(loaded.model, config)
    optimizer = build_optimizer(parameters, config)
    if resume is not None:
        restore_optimizer(optimizer, parameters.named, resume.moments)
        if resume.rng_state is not None:
            torch.set_rng_state(resume.rng_state)
        position = resume.position
    else:
        position = RunPosition(total_steps=plan_total_steps(shard_list, config))

    trainer = _Trainer(loaded, config, parameters, optimizer)
    session = _Session(position.samples_seen)
    earlier_sessions = position.wall_seconds

    def save_partial() -> None:
        position.wall_seconds = earlier_sessions + session.elapsed()
        _save(loaded, out_path, position, identity, trainer, complete=False)

    try:
        stopped = _run(trainer, shard_list, config, position, session, progress_callback, should_stop, save_partial)
    finally:
        loaded.model.eval()
    position.wall_seconds = earlier_sessions + session.elapsed()
    complete = not stopped
    checkpoint, state = _save(loaded, out_path, position, identity, trainer, complete=complete)
    return FinetuneResult(
        checkpoint=checkpoint,
        resume_state=state,
        complete=complete,
        steps=position.step,
        total_steps=position.total_steps,
        epochs_completed=position.epoch,
        samples_seen=position.samples_seen,
        bad_samples=dict(sorted(position.tally.by_reason.items())),
        bad_examples=list(position.tally.examples),
        shard_problems=list(position.tally.shard_problems),
        final_loss=position.losses[-1] if position.losses else None,
        losses=list(position.losses),
        wall_seconds=session.elapsed(),
        samples_per_second=session.samples_per_second(position.samples_seen),
    )


def _trainable_model(model: ModelSpec | LoadedModel) -> LoadedModel:
    if isinstance(model, ModelSpec):
        # Training needs fp32 master weights whatever precision inference would use.
        return load_model(replace(model, precision="fp32"))
    low = sorted({str(p.dtype) for p in model.model.parameters() if p.dtype != torch.float32})
    if low:
        raise FinetuneError(
            f"the model's weights are {', '.join(low)}; fine-tuning needs fp32 weights (load it with "
            "precision fp32 and set FinetuneConfig.precision to train under bf16 autocast)"
        )
    return model


def plan_total_steps(shards: list[Shard], config: FinetuneConfig) -> int:
    """The schedule's length: ``max_steps``, else epochs x full batches in one pass (counted)."""
    if config.max_steps is not None:
        return config.max_steps
    samples = count_raw_samples(shards)
    per_epoch = samples // config.batch_size
    if per_epoch == 0:
        raise FinetuneError(
            f"the shards hold {samples} samples, fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    return per_epoch * config.epochs


def _finished(position: RunPosition, config: FinetuneConfig) -> bool:
    return position.epoch >= config.epochs or (
        config.max_steps is not None and position.step >= config.max_steps
    )


def _run(
    trainer: _Trainer,
    shards: list[Shard],
    config: FinetuneConfig,
    position: RunPosition,
    session: _Session,
    progress_callback: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
    save_partial: Callable[[], Any],
) -> bool:
    """Train until the run is finished (returns False) or asked to stop (returns True)."""
    loaded = trainer.loaded
    dataset = TrainPairs(shards, loaded.preprocess, loaded.tokenizer, config.seed, config.shuffle_buffer)
    while not _finished(position, config):
        dataset.epoch = position.epoch
        # Bad samples are counted once each: in the first pass; later passes meet them again.
        tally = position.tally if position.epoch == 0 else None
        replayed = position.batches_in_epoch
        stream = batches(chunk_loader(dataset, config.workers), config.batch_size, tally, replay=replayed)
        with contextlib.closing(stream):
            for batch in stream:
                lr = learning_rate(position.step, config, position.total_steps)
                loss = trainer.step(batch, lr)
                position.step += 1
                position.batches_in_epoch += 1
                position.samples_seen += len(batch)
                position.losses.append(loss)
                if progress_callback is not None:
                    progress_callback(session.progress(position, loss, lr))
                if config.save_every and position.step % config.save_every == 0:
                    save_partial()
                if _finished(position, config):
                    return False
                if should_stop is not None and should_stop():
                    return True
        if position.batches_in_epoch == 0:
            raise FinetuneError(_no_batch_message(position, config))
        position.epoch += 1
        position.batches_in_epoch = 0
    return False


def _no_batch_message(position: RunPosition, config: FinetuneConfig) -> str:
    tally = position.tally
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(tally.by_reason.items())) or "none"
    shard_errors = "; ".join(f"{p['shard']}: {p['error']}" for p in tally.shard_problems[:3])
    return (
        f"a whole pass over the shards gave no full batch of {config.batch_size} usable pairs "
        f"({tally.partial_batch_dropped} usable; skipped by reason: {reasons}"
        + (f"; unreadable shards: {shard_errors}" if shard_errors else "")
        + ")"
    )


class _Trainer:
    """The model, its loss and optimizer, and one optimizer step."""

    def __init__(self, loaded: LoadedModel, config: FinetuneConfig, parameters: TrainableParameters, optimizer):
        self.loaded = loaded
        self.config = config
        self.parameters = parameters
        self.optimizer = optimizer
        self.model = loaded.model
        self.device = loaded.info.device
        self.loss = _contrastive_loss(self.model)
        self.trainable = [p for _, p in parameters.decay + parameters.no_decay]
        self.cast = _AUTOCAST[config.precision]
        self.math_attention = config.attention == "auto" and self.cast is not None and not self.device.startswith("cuda")

    def step(self, batch, lr: float) -> float:
        model, config = self.model, self.config
        model.train()
        set_learning_rate(self.optimizer, lr)
        pixels = batch.pixels.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        with self._forward_context():
            # A frozen tower runs without a graph: same outputs, no activations kept for backward.
            with torch.set_grad_enabled(not config.freeze_image):
                image = F.normalize(model.encode_image(pixels), dim=-1)
            with torch.set_grad_enabled(not config.freeze_text):
                text = F.normalize(text_features(model, tokens), dim=-1)
            loss = self.loss(image, text, model.logit_scale.exp(), getattr(model, "logit_bias", None))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature
        return float(loss.detach())

    def _forward_context(self):
        if self.cast is None:
            return contextlib.nullcontext()
        context = contextlib.ExitStack()
        context.enter_context(torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=self.cast))
        if self.math_attention:
            # Under bf16 autocast on CPU, the flash kernel's backward is slow on CLIP's short
            # sequences (50-77 tokens): the plain matmul-softmax kernel made a whole training step
            # 1.28x faster for the bundled tiny CLIP and 1.23x for ViT-B-32 on a 2-core EPYC
            # (benchmarks/bench_train_attention.py); in fp32 a bare step was 8% slower with it,
            # so fp32 keeps the default. Autograd records the kernel chosen in the forward pass,
            # so the backward follows it. It keeps the attention matrix for the backward pass:
            # for long sequences (ViT-L/14 at 336 px) set attention="default".
            context.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return context


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features, cut to the batch's longest caption where that is exact."""
    if supports_trimmed_text(model):
        return encode_text_trimmed(model, tokens)
    return model.encode_text(tokens)


def _contrastive_loss(model: torch.nn.Module) -> torch.nn.Module:
    if getattr(model, "logit_bias", None) is not None:
        return SigLipLoss(rank=0, world_size=1)
    return ClipLoss(rank=0, world_size=1)


class _Session:
    """Timing of this call (a resumed run's earlier sessions are not in its throughput)."""

    def __init__(self, samples_at_start: int):
        self.started = time.perf_counter()
        self.samples_at_start = samples_at_start

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def samples_per_second(self, samples_seen: int) -> float:
        return (samples_seen - self.samples_at_start) / max(self.elapsed(), 1e-9)

    def progress(self, position: RunPosition, loss: float, lr: float) -> TrainProgress:
        return TrainProgress(
            step=position.step,
            total_steps=position.total_steps,
            epoch=position.epoch,
            loss=loss,
            lr=lr,
            samples_seen=position.samples_seen,
            samples_per_second=self.samples_per_second(position.samples_seen),
        )


# ---------------------------------------------------------------------------------------------
# Identity, resume and saving


def _as_shards(shards: list[str] | list[Shard] | str) -> list[Shard]:
    if isinstance(shards, (str, Path)):
        return resolve_shards([str(shards)])
    items = list(shards)
    if items and all(isinstance(s, Shard) for s in items):
        return items
    return resolve_shards([str(s) for s in items])


def _checkpoint_path(out_path: Path | str) -> Path:
    path = Path(out_path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def _shard_address(shard: Shard) -> str:
    # Absolute local paths, so that a run resumed from another folder is still the same run.
    if shard.is_remote or shard.url.startswith("pipe:"):
        return shard.url
    return str(Path(shard.url.removeprefix("file://")).resolve())


def run_identity(loaded: LoadedModel, shards: list[Shard], config: FinetuneConfig) -> dict[str, Any]:
    info = loaded.info
    return {
        "architecture": info.architecture,
        "start_model": {
            "architecture": info.architecture,
            "pretrained": info.pretrained,
            "weights_source": info.weights_source,
            "weights_path": info.weights_path,
            "weights_sha256": info.weights_sha256,
        },
        "shards": [_shard_address(s) for s in shards],
        "config": config.to_dict(),
    }


def _open_resume(checkpoint: Path, loaded: LoadedModel, identity: dict[str, Any]) -> ResumeState:
    """Check that the checkpoint continues this very run, then load its weights into the model."""
    checkpoint = _checkpoint_path(checkpoint)
    if not checkpoint.is_file():
        raise FinetuneError(f"cannot resume: checkpoint {checkpoint} does not exist")
    resume = load_resume_state(resume_state_path(checkpoint))
    stored = resume.identity
    _check_same_run(stored, identity, loaded, checkpoint)
    sidecar = read_sidecar(checkpoint) or {}
    saved_step = sidecar.get("training", {}).get("steps")
    if saved_step != resume.position.step:
        raise FinetuneError(
            f"{checkpoint} (step {saved_step}) and its resume state (step {resume.position.step}) "
            "disagree; the run was cut while saving. Resume is not possible from these files."
        )
    state = read_state_dict(checkpoint)
    own = loaded.model.state_dict()
    loaded.model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=True)
    return resume


def _check_same_run(stored: dict, current: dict, loaded: LoadedModel, checkpoint: Path) -> None:
    if stored["architecture"] != current["architecture"]:
        raise FinetuneError(
            f"cannot resume: {checkpoint} is a {stored['architecture']} run, the model given is "
            f"{current['architecture']}"
        )
    given = loaded.info.weights_sha256
    if given not in (stored["start_model"]["weights_sha256"], sha256_file(checkpoint)):
        raise FinetuneError(
            "cannot resume: the model given is neither the run's starting model "
            f"({stored['start_model']['weights_path']}) nor the checkpoint itself"
        )
    if stored["shards"] != current["shards"]:
        raise FinetuneError(
            f"cannot resume: the run trained on {len(stored['shards'])} other shards "
            f"(first {stored['shards'][:1]}); pass the same --data"
        )
    differences = [
        f"{key}={current['config'].get(key)!r} (the run has {value!r})"
        for key, value in stored["config"].items()
        if key not in RESUMABLE_DIFFERENCES and current["config"].get(key) != value
    ]
    if differences:
        raise FinetuneError("cannot resume with different settings: " + "; ".join(differences))


def _save(
    loaded: LoadedModel,
    out_path: Path,
    position: RunPosition,
    identity: dict[str, Any],
    trainer: _Trainer,
    complete: bool,
) -> tuple[Path, Path | None]:
    """Resume state first, then the checkpoint whose sidecar names the same step: a crash in
    between leaves a pair that ``_open_resume`` recognises as inconsistent."""
    state_path = resume_state_path(out_path)
    if complete:
        state_path.unlink(missing_ok=True)
        state = None
    else:
        state = save_resume_state(state_path, position, identity, trainer.optimizer, trainer.parameters.named)
    provenance = {"training": _provenance(position, identity, complete, state)}
    checkpoint = save_checkpoint(loaded.model, out_path, loaded.info.architecture, provenance)
    return checkpoint, state


def _provenance(position: RunPosition, identity: dict[str, Any], complete: bool, state: Path | None) -> dict:
    shards = identity["shards"]
    return {
        "tool": "clipguard.training.finetune",
        "clipguard_version": clipguard.__version__,
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
        "complete": complete,
        "start_model": identity["start_model"],
        "data": {
            "shard_count": len(shards),
            "shards": shards[:MAX_SHARDS_LISTED],
            "shard_list_sha256": hashlib.sha256("\n".join(shards).encode()).hexdigest(),
        },
        "hyperparameters": identity["config"],
        "seed": identity["config"]["seed"],
        "steps": position.step,
        "total_steps": position.total_steps,
        "epochs_completed": position.epoch,
        "samples_seen": position.samples_seen,
        "bad_samples": position.tally.to_dict(),
        "final_loss": position.losses[-1] if position.losses else None,
        "wall_seconds": round(position.wall_seconds, 3),
        "resume_state": state.name if state is not None else None,
    }
