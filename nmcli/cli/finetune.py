"""``nmcli finetune``: recover a pruned checkpoint's accuracy with SR-STE (and distillation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from nmcli.cli.app import emit_json, esc, guarded, show_progress, stderr
from nmcli.cli.options import number

if TYPE_CHECKING:
    from collections.abc import Callable

    from nmcli.pipelines.training import FinetuneResult, StepInfo


@guarded
def command(
    checkpoint: str = typer.Argument(..., help="nmcli/1 checkpoint to fine-tune (from nmcli prune)."),
    data: str = typer.Option(
        ...,
        "--data",
        help="Training data: tensors:FILE.safetensors, text:FILE.txt, imagefolder:DIR or py:module:callable.",
    ),
    teacher: str = typer.Option(
        "auto", "--teacher", help="Distill from: auto (the dense model the checkpoint came from), none, or a MODEL."
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        help="Optimizer steps (default: --epochs 1).",
        callback=number("--steps", minimum=1, maximum=1e9),
    ),
    epochs: float | None = typer.Option(
        None,
        "--epochs",
        help="Passes over the data (instead of --steps).",
        callback=number("--epochs", minimum=0, exclusive=True, maximum=1e6),
    ),
    batch_size: int = typer.Option(
        32,
        "--batch-size",
        help="Global batch per micro-step (split over processes).",
        callback=number("--batch-size", minimum=1, maximum=1e7),
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Peak learning rate (default 0.01 for sgd, 1e-4 for adamw).",
        callback=number("--lr", minimum=0, exclusive=True, maximum=1e3),
    ),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adamw."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine or constant (after warm-up)."),
    momentum: float = typer.Option(
        0.9, "--momentum", help="SGD momentum.", callback=number("--momentum", minimum=0, maximum=1)
    ),
    weight_decay: float = typer.Option(
        0.0,
        "--weight-decay",
        help="Weight decay of weights (not biases/norms).",
        callback=number("--weight-decay", minimum=0, maximum=1e3),
    ),
    warmup_steps: int = typer.Option(
        0,
        "--warmup-steps",
        help="Linear learning-rate warm-up steps.",
        callback=number("--warmup-steps", minimum=0, maximum=1e9),
    ),
    grad_accum: int = typer.Option(
        1,
        "--grad-accum",
        help="Micro-batches per optimizer step.",
        callback=number("--grad-accum", minimum=1, maximum=1e6),
    ),
    max_grad_norm: float | None = typer.Option(
        None,
        "--max-grad-norm",
        help="Clip the gradient norm to this.",
        callback=number("--max-grad-norm", minimum=0, exclusive=True, maximum=1e9),
    ),
    ste: str = typer.Option("sr", "--ste", help="sr (SR-STE) or plain (vanilla STE, lambda_w = 0)."),
    lambda_w: float = typer.Option(
        2e-4,
        "--lambda-w",
        help="SR-STE decay of pruned weights.",
        callback=number("--lambda-w", minimum=0, maximum=1e3),
    ),
    mask_interval: int = typer.Option(
        1,
        "--mask-interval",
        help="Recompute masks every K steps.",
        callback=number("--mask-interval", minimum=1, maximum=1e9),
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (autocast; fp16 needs CUDA)."),
    save_every: int = typer.Option(
        0,
        "--save-every",
        help="Write a resumable checkpoint every N steps.",
        callback=number("--save-every", minimum=0, maximum=1e9),
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the resumable checkpoint at -o."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and initialisation."),
    no_dense: bool = typer.Option(False, "--no-dense", help="Do not store the dense weights in the output."),
    max_length: int = typer.Option(
        128,
        "--max-length",
        help="Token limit per line of text: data.",
        callback=number("--max-length", minimum=1, maximum=1e6),
    ),
    temperature: float = typer.Option(
        2.0,
        "--temperature",
        help="Distillation temperature on logits.",
        callback=number("--temperature", minimum=0, exclusive=True, maximum=1e3),
    ),
    log_every: int = typer.Option(
        0,
        "--log-every",
        help="Write a plain progress line to stderr every N steps.",
        callback=number("--log-every", minimum=0, maximum=1e9),
    ),
    bn: str = typer.Option(
        "train", "--bn", help="BatchNorm while training: train (batch statistics) or freeze (running statistics fixed)."
    ),
    bn_batches: int = typer.Option(
        50,
        "--bn-batches",
        help="Training batches to re-estimate BatchNorm statistics on before saving (0: off).",
        callback=number("--bn-batches", minimum=0, maximum=1e7),
    ),
    eval_data: str | None = typer.Option(
        None, "--eval-data", help="Held-out data (any --data spec) to evaluate on in eval mode."
    ),
    eval_split: float = typer.Option(
        0.05,
        "--eval-split",
        help="Without --eval-data, hold out this share of the training data (0: off).",
        callback=number("--eval-split", minimum=0, maximum=0.5),
    ),
    eval_every: int = typer.Option(
        0,
        "--eval-every",
        help="Also evaluate every N steps (0: before and after only).",
        callback=number("--eval-every", minimum=0, maximum=1e9),
    ),
    arch: str | None = typer.Option(None, "--arch", help="Architecture source overriding the checkpoint's."),
    trust: bool = typer.Option(
        False,
        "--trust",
        help="Run code a file holds: a pickled nn.Module, or a checkpoint's recorded py:/pickled source (only for authors you trust).",
    ),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output checkpoint (default: CHECKPOINT-ft.safetensors beside it)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Fine-tune a pruned checkpoint with SR-STE and write the recovered nmcli/1 checkpoint.

    The forward pass uses the masked weights `M(W) ⊙ W`; the dense W gets the straight-through gradient
    plus `lambda_w (1 - M) ⊙ W`, and the masks are recomputed from W every --mask-interval steps. Runs
    unchanged under torchrun (DistributedDataParallel). BatchNorm statistics are re-estimated with
    the final masks before every save (--bn-batches); the model is evaluated in eval mode on held-out
    data (--eval-data, else --eval-split of the training data) before, every --eval-every steps and
    after. Ctrl-C stops at the next step boundary and saves a checkpoint that --resume continues exactly.
    """
    from nmcli.commands.finetune import run_finetune
    from nmcli.pipelines.training import FinetuneConfig
    from nmcli.trust import remember_command_line

    remember_command_line([checkpoint, arch, teacher], trust=trust)  # the user's own code: later rebuilds may run it

    config = FinetuneConfig(
        data=data,
        teacher=teacher,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        ste=ste,
        lambda_w=lambda_w,
        mask_interval=mask_interval,
        device=device,
        precision=precision,
        save_every=save_every,
        seed=seed,
        no_dense=no_dense,
        max_length=max_length,
        temperature=temperature,
        log_every=log_every,
        bn=bn,
        bn_batches=bn_batches,
        eval_data=eval_data,
        eval_split=eval_split,
        eval_every=eval_every,
    )
    with _reporter(show_progress(json_output), log_every) as on_step:
        result = run_finetune(
            checkpoint,
            config,
            output=output,
            force=force,
            arch=arch,
            trust=trust,
            resume=resume,
            on_step=on_step,
            on_eval=_eval_line,
        )
    if result.output is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    _render(result)
    if json_output:
        emit_json(result.to_json())
    if result.interrupted:
        raise typer.Exit(128 + (result.stopped_by or 2))  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


class _reporter:
    """Progress bar on a terminal and/or ``--log-every`` lines on stderr; yields the step callback."""

    def __init__(self, bar: bool, log_every: int) -> None:
        self.bar, self.log_every = bar, log_every
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[StepInfo], None]:
        if self.bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]finetune"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} steps/s"),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("finetune", total=None, loss="-", lr="-", rate="-")
        return self.update

    def update(self, info: StepInfo) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=info.step,
                total=info.total,
                loss=f"{info.loss:.4f}",
                lr=f"{info.lr:.2e}",
                rate=f"{info.steps_per_second:.2f}",
            )
        if self.log_every and (info.step % self.log_every == 0 or info.step == info.total):
            eta = (info.total - info.step) / info.steps_per_second if info.steps_per_second else 0.0
            line = (
                f"step {info.step}/{info.total} loss {info.loss:.6f} lr {info.lr:.3e} "
                f"{info.steps_per_second:.2f} steps/s eta {eta:.0f}s"
            )
            if self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False)
            else:
                stderr.print(line, markup=False, highlight=False)
                stderr.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _render(result: FinetuneResult) -> None:
    for note in result.notes:
        stderr.print(f"[dim]note:[/dim] {esc(note)}")
    for when in ("before", "after"):
        if when in result.evals:
            stderr.print(f"eval {when}: {_metrics(result.evals[when])}", highlight=False)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    sad = (
        f"SAD vs start {result.sad_vs_start.sad:,} of {result.sad_vs_start.total:,} weights "
        f"({100 * result.sad_vs_start.normalized:.2f}%)"
    )
    if result.interrupted:
        stderr.print(
            f"[yellow]interrupted[/yellow] at step {result.steps} of {result.total_steps} (loss {loss}, {sad}); "
            f"resumable checkpoint saved to {esc(str(result.output))}; resume with: {esc(_resume_command())}"
        )
        return
    stderr.print(
        f"fine-tuned {result.steps} steps in {result.seconds:.1f}s: final loss {loss}, {sad} -> "
        f"[bold]{esc(str(result.output))}[/bold]"
    )


def _metrics(metrics: dict[str, float]) -> str:
    shown = []
    for name, value in metrics.items():
        if name == "examples":
            continue
        percent = name in ("accuracy", "teacher_top1", "teacher_cosine")
        shown.append(f"{name} {100 * value:.2f}%" if percent else f"{name} {value:.4g}")
    return ", ".join(shown) + f" ({int(metrics.get('examples', 0))} examples)"


def _resume_command() -> str:
    """The command line that was run, with --resume added (once)."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if a != "--resume"]
    return shlex.join(["nmcli", *args, "--resume"])


def _eval_line(step: int, metrics: dict[str, float]) -> None:
    stderr.print(f"eval at step {step}: {_metrics(metrics)}", highlight=False)
