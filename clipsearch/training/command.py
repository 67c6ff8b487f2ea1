"""The `clipsearch train` command: options in, progress bar and a recall table out.

`cli.py` registers it at start-up, so this module imports only typer: torch and the training
code come in when the command runs, keeping every other command's start-up fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    ctx: typer.Context,
    output: Path = typer.Argument(
        ..., help="Directory for the checkpoint (loads with --model DIR).", show_default=False
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="CSV or JSONL of path,caption, or a folder of images with same-named .txt captions "
        "(default: synthetic scenes, generated on the fly).",
        show_default=False,
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="Train from scratch: an architecture preset (demo, tiny) or a config.json (default: demo).",
    ),
    init: str | None = typer.Option(None, "--init", help="Fine-tune this model (a name or a checkpoint path)."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", "-b", min=2),
    samples_per_epoch: int = typer.Option(20_000, "--samples-per-epoch", min=1, help="Synthetic scenes per epoch."),
    hard_negatives: int = typer.Option(
        3,
        "--hard-negatives",
        min=0,
        max=3,
        help="Synthetic scenes: changed copies of each scene (another shape, colour, ...) put in its batch.",
    ),
    single_object_epochs: int = typer.Option(
        0,
        "--single-object-epochs",
        min=0,
        help="Synthetic scenes: first epochs with one object per scene, where shapes are learned fastest.",
    ),
    scene_style: str = typer.Option(
        "mixed",
        "--scene-style",
        help="Synthetic scenes: classic (grid, fixed sizes), varied (any size, place, angle, background) or mixed.",
    ),
    val_size: int = typer.Option(1_000, "--val-size", min=2, help="Held-out pairs evaluated after each epoch."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate."),
    weight_decay: float = typer.Option(0.1, "--weight-decay"),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    bpe_merges: int = typer.Option(400, "--bpe-merges", min=1, help="Size of the vocabulary learned for a new model."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loading worker processes."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads for the model (default: as many as PyTorch picks). On a busy machine 1 can be many "
        "times faster.",
    ),
    precision: str = typer.Option("auto", "--precision", help="auto (mixed on CUDA, fp32 on CPU), fp32, fp16, bf16."),
    lock_image: bool = typer.Option(False, "--lock-image", help="Freeze the image tower (LiT)."),
    lock_text: bool = typer.Option(False, "--lock-text", help="Freeze the text tower."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run saved in OUTPUT with its saved options (--epochs N extends it to N epochs).",
    ),
) -> None:
    """Train a CLIP contrastively on image–caption pairs, from scratch or from a checkpoint."""
    import torch
    from tqdm import tqdm

    from clipsearch.cli_settings import settings
    from clipsearch.training.checkpoint import resumed_options
    from clipsearch.training.loop import EpochResult, StepInfo
    from clipsearch.training.loop import train as run
    from clipsearch.training.options import TrainOptions
    from clipsearch.training.scenes import STYLES

    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise typer.BadParameter("use auto, fp32, fp16 or bf16", param_hint="--precision")
    if scene_style not in STYLES:
        raise typer.BadParameter(f"use {', '.join(STYLES)}", param_hint="--scene-style")
    device = None if settings.device == "auto" else settings.device
    if resume:
        # Continue the saved run as it was started: only what the command line gives explicitly
        # reaches it, and what would change the run is refused there.
        given = {
            name: value
            for name, value in ctx.params.items()
            if name not in ("output", "resume", "threads") and _given(ctx, name)
        }
        options = resumed_options(output, {**given, "device": device})
    else:
        options = TrainOptions(
            output=output,
            data=data,
            config=config,
            init=init,
            epochs=epochs,
            batch_size=batch_size,
            samples_per_epoch=samples_per_epoch,
            hard_negatives=hard_negatives,
            single_object_epochs=single_object_epochs,
            scene_style=scene_style,
            val_size=val_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            grad_clip=grad_clip,
            bpe_merges=bpe_merges,
            seed=seed,
            workers=workers,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            lock_image=lock_image,
            lock_text=lock_text,
            resume=resume,
        )
    if threads is not None:
        torch.set_num_threads(threads)
    bar: tqdm | None = None

    def on_step(info: StepInfo) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=info.total_steps, initial=info.step - 1, unit="step", disable=settings.quiet, dynamic_ncols=True
            )
        bar.set_postfix(
            epoch=info.epoch,
            loss=f"{info.loss:.3f}",
            lr=f"{info.lr:.2e}",
            scale=f"{info.logit_scale:.1f}",
            refresh=False,
        )
        bar.update(1)

    header_shown = False

    def on_epoch(result: EpochResult) -> None:
        nonlocal header_shown
        if settings.quiet:  # as for `index`: the figures are in metrics.jsonl
            return
        columns = list(result.recall)
        if not header_shown:
            tqdm.write("epoch  step    loss  " + "  ".join(_short(c) for c in columns) + "   time")
            header_shown = True
        recalls = "  ".join(f"{result.recall[c]:>{len(_short(c))}.3f}" for c in columns)
        tqdm.write(
            f"{result.epoch:>5}  {result.step:>4}  {result.train_loss:>6.3f}  {recalls}  {result.seconds:>5.0f}s"
        )

    try:
        run(options, on_step=on_step, on_epoch=on_epoch)
    finally:
        if bar is not None:
            bar.close()
    if not settings.quiet:
        typer.echo(f"Saved to {output} (use it with --model {output}).")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the command line (or the environment) gave this option, rather than its default.
    By name: typer may bring its own copy of click, whose enum is not click's."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _short(column: str) -> str:
    """ "image_to_text@5" -> "i2t@5"."""
    direction, k = column.split("@")
    return {"image_to_text": "i2t", "text_to_image": "t2i"}[direction] + f"@{k}"
