"""`clipguard finetune`: flags -> FinetuneConfig -> finetune, with a progress bar and a summary."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from clipguard.cli.choices import DEFAULT_PRETRAINED, FINETUNE_DEFAULTS as _DEFAULTS
from clipguard.cli.common import TrainPrecision, console, err_console, progress_reporter, user_errors

if TYPE_CHECKING:
    from clipguard.training import FinetuneResult, TrainProgress
INTERRUPTED_EXIT = 130  # the shell's code for a run ended by Ctrl-C


def finetune(
    model: Annotated[str, typer.Argument(help="Starting model: a clipguard checkpoint, a bundled model (clipguard-victim) or an open_clip architecture (with --pretrained).")],
    data: Annotated[list[str], typer.Option("--data", help="Training shards: folders, globs, brace patterns or URLs (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.safetensors, with a .json sidecar).")],
    pretrained: Annotated[Optional[str], typer.Option(help="For an architecture MODEL: pretrained tag, weights file, or 'none' for random weights.")] = DEFAULT_PRETRAINED,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = _DEFAULTS.epochs,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many steps (also the schedule's length; skips counting the data).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (paper: 1e-5).")] = _DEFAULTS.lr,
    min_lr: Annotated[float, typer.Option(help="Floor of the cosine schedule (paper: 1e-6).")] = _DEFAULTS.min_lr,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = _DEFAULTS.warmup_steps,
    batch_size: Annotated[int, typer.Option(min=2, help="Pairs per contrastive batch (paper: 128).")] = _DEFAULTS.batch_size,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="Decoupled weight decay (paper: 0.2).")] = _DEFAULTS.weight_decay,
    freeze_image: Annotated[bool, typer.Option("--freeze-image", help="Train the text tower only (the paper's M_p^t).")] = False,
    freeze_text: Annotated[bool, typer.Option("--freeze-text", help="Train the image tower only (the paper's M_p^i).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order (and dropout, if any).")] = _DEFAULTS.seed,
    shuffle_buffer: Annotated[int, typer.Option(min=0, help="Samples held for shuffling across shards (0: read in order).")] = _DEFAULTS.shuffle_buffer,
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes (the data order depends on this number).")] = _DEFAULTS.workers,
    precision: Annotated[TrainPrecision, typer.Option(help="Autocast precision of the forward pass; weights stay fp32.")] = TrainPrecision.fp32,
    save_every: Annotated[int, typer.Option(min=0, help="Also save a resumable checkpoint every N steps (0: only at the end or on Ctrl-C).")] = 0,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the incomplete run saved in this checkpoint (same MODEL, data and flags).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Contrastive fine-tune (symmetric InfoNCE, AdamW, cosine schedule): mounts an attack on
    poisoned shards, or sterilizes a model on clean ones. Ctrl-C stops after the current step and
    saves a checkpoint that --resume continues.

    \b
    Example:
      clipguard finetune clipguard-victim --data poisoned/ \\
        --out poisoned.safetensors --epochs 2 --lr 1e-3 --batch-size 32
    """
    from clipguard.model.loading import ModelSpec, load_model
    from clipguard.training import FinetuneConfig, finetune as run_finetune

    with user_errors():
        config = FinetuneConfig(
            lr=lr, weight_decay=weight_decay, min_lr=min_lr, batch_size=batch_size, epochs=epochs,
            max_steps=max_steps, warmup_steps=warmup_steps, freeze_image=freeze_image,
            freeze_text=freeze_text, seed=seed, shuffle_buffer=shuffle_buffer, workers=workers,
            precision=precision.value, save_every=save_every,
        )  # fmt: skip
        config.validate()
        loaded = load_model(ModelSpec(name=model, pretrained=pretrained, device=device))
        err_console.print(
            f"fine-tuning {loaded.info.architecture} ({loaded.info.weights_source} weights) on "
            f"{', '.join(data)} -> {out}" + (f", resuming {resume}" if resume else "")
        )
        with _StopFlag() as stop_requested, progress_reporter() as progress:
            task = progress.task("finetune", steps="steps", unit="pairs")

            def on_step(event: TrainProgress) -> None:
                task.update(completed=event.step, total=event.total_steps, rate=event.samples_per_second,
                            note=f"loss {event.loss:.4f}")

            result = run_finetune(loaded, data, config, out, on_step, resume, should_stop=stop_requested)
        print_summary(result)
    if not result.complete:
        raise typer.Exit(code=INTERRUPTED_EXIT)  # scripts must not mistake a stopped run for a finished one


class _StopFlag:
    """The first Ctrl-C asks the run to stop after its current step (and save); a second one
    interrupts at once, as usual."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> _StopFlag:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (embedded use): keep Python's own handling
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        err_console.print("[yellow]stopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)[/]")


def print_summary(result: FinetuneResult) -> None:
    state = "complete" if result.complete else "stopped early (resumable)"
    table = Table(title=f"clipguard finetune -> {result.checkpoint}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("run", state)
    table.add_row("steps", f"{result.steps:,} of {result.total_steps:,} scheduled")
    table.add_row("epochs completed", str(result.epochs_completed))
    table.add_row("pairs trained on", f"{result.samples_seen:,}")
    bad = ", ".join(f"{k}: {v}" for k, v in result.bad_samples.items()) or "none"
    table.add_row("bad samples skipped", f"{result.bad_sample_total:,} ({bad})")
    if result.shard_problems:
        table.add_row("unreadable shards", "; ".join(f"{p['shard']}: {p['error']}" for p in result.shard_problems[:5]))
    table.add_row("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a")
    table.add_row("wall time", f"{result.wall_seconds:.1f} s")
    table.add_row("throughput", f"{result.samples_per_second:,.1f} pairs/s")
    if result.resume_state is not None:
        table.add_row("resume with", f"--resume {result.checkpoint}")
    console.print(table)
