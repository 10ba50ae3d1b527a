"""``nmcli finetune``: recover a pruned checkpoint's accuracy with SR-STE (and distillation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from nmcli.cli.app import emit_json, esc, guarded, plain_progress, show_progress, stderr
from nmcli.cli.options import DATA_SPECS, ForceOption, JsonOption, ModelClassOption, TrustOption, number_option

if TYPE_CHECKING:
    from collections.abc import Callable

    from nmcli.pipelines.training import FinetuneResult, StepInfo


CheckpointArgument = Annotated[str, typer.Argument(help="nmcli/1 checkpoint to fine-tune (from nmcli prune).")]
DataOption = Annotated[str, typer.Option("--data", help=f"Training data: {DATA_SPECS}.")]
TeacherOption = Annotated[
    str,
    typer.Option("--teacher", help="Distill from: auto (the dense model the checkpoint came from), none, or a MODEL."),
]

# the schedule: how long, how big, how fast
StepsOption = Annotated[
    int | None, number_option("--steps", help="Optimizer steps (default: --epochs 1).", minimum=1, maximum=1e9)
]
EpochsOption = Annotated[
    float | None,
    number_option(
        "--epochs", help="Passes over the data (instead of --steps).", minimum=0, exclusive=True, maximum=1e6
    ),
]
BatchSizeOption = Annotated[
    int,
    number_option("--batch-size", help="Global batch per micro-step (split over processes).", minimum=1, maximum=1e7),
]
LrOption = Annotated[
    float | None,
    number_option(
        "--lr",
        help="Peak learning rate (default 0.01 for sgd, 1e-4 for adamw).",
        minimum=0,
        exclusive=True,
        maximum=1e3,
    ),
]
OptimizerOption = Annotated[str, typer.Option("--optimizer", help="sgd or adamw.")]
ScheduleOption = Annotated[str, typer.Option("--schedule", help="cosine or constant (after warm-up).")]
MomentumOption = Annotated[float, number_option("--momentum", help="SGD momentum.", minimum=0, maximum=1)]
WeightDecayOption = Annotated[
    float,
    number_option("--weight-decay", help="Weight decay of weights (not biases/norms).", minimum=0, maximum=1e3),
]
WarmupStepsOption = Annotated[
    int, number_option("--warmup-steps", help="Linear learning-rate warm-up steps.", minimum=0, maximum=1e9)
]
GradAccumOption = Annotated[
    int, number_option("--grad-accum", help="Micro-batches per optimizer step.", minimum=1, maximum=1e6)
]
MaxGradNormOption = Annotated[
    float | None,
    number_option("--max-grad-norm", help="Clip the gradient norm to this.", minimum=0, exclusive=True, maximum=1e9),
]

# SR-STE
SteOption = Annotated[str, typer.Option("--ste", help="sr (SR-STE) or plain (vanilla STE, lambda_w = 0).")]
LambdaWOption = Annotated[
    float, number_option("--lambda-w", help="SR-STE decay of pruned weights.", minimum=0, maximum=1e3)
]
MaskIntervalOption = Annotated[
    int, number_option("--mask-interval", help="Recompute masks every K steps.", minimum=1, maximum=1e9)
]

# where and how it runs, saves and resumes
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
PrecisionOption = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; fp16 needs CUDA).")]
ShardOption = Annotated[
    str,
    typer.Option(
        "--shard",
        help="Under torchrun: ddp (the default: every process holds the whole model, the fastest when it fits "
        "one device) or fsdp (FSDP2: weights, gradients and optimizer state split over the processes, for models "
        "no single device holds; resumable state in OUT.dcp/). No effect on one process.",
    ),
]
ActivationCheckpointingOption = Annotated[
    bool,
    typer.Option(
        "--activation-checkpointing", help="With --shard fsdp: recompute each block's activations in backward."
    ),
]
SaveEveryOption = Annotated[
    int,
    number_option("--save-every", help="Write a resumable checkpoint every N steps.", minimum=0, maximum=1e9),
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the resumable checkpoint at -o.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the data order and initialisation.")]
NoDenseOption = Annotated[bool, typer.Option("--no-dense", help="Do not store the dense weights in the output.")]
MaxLengthOption = Annotated[
    int, number_option("--max-length", help="Token limit per line of text: data.", minimum=1, maximum=1e6)
]
TemperatureOption = Annotated[
    float,
    number_option("--temperature", help="Distillation temperature on logits.", minimum=0, exclusive=True, maximum=1e3),
]
LogEveryOption = Annotated[
    int,
    number_option("--log-every", help="Write a plain progress line to stderr every N steps.", minimum=0, maximum=1e9),
]

# BatchNorm and evaluation
BnOption = Annotated[
    str,
    typer.Option(
        "--bn", help="BatchNorm while training: train (batch statistics) or freeze (running statistics fixed)."
    ),
]
BnBatchesOption = Annotated[
    int,
    number_option(
        "--bn-batches",
        help="Training batches to re-estimate BatchNorm statistics on before saving (0: off).",
        minimum=0,
        maximum=1e7,
    ),
]
EvalDataOption = Annotated[
    str | None, typer.Option("--eval-data", help="Held-out data (any --data spec) to evaluate on in eval mode.")
]
EvalSplitOption = Annotated[
    float,
    number_option(
        "--eval-split",
        help="Without --eval-data, hold out this share of the training data (0: off).",
        minimum=0,
        maximum=0.5,
    ),
]
EvalEveryOption = Annotated[
    int,
    number_option(
        "--eval-every", help="Also evaluate every N steps (0: before and after only).", minimum=0, maximum=1e9
    ),
]

# the input's architecture and the output
FinetuneArchOption = Annotated[
    str | None, typer.Option("--arch", help="Architecture source overriding the checkpoint's.")
]
OutputOption = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="Output checkpoint (default: CHECKPOINT-ft.safetensors beside it; a sharded checkpoint directory DIR: the directory DIR-ft).",
    ),
]


@guarded
def command(
    ctx: typer.Context,
    checkpoint: CheckpointArgument,
    data: DataOption,
    teacher: TeacherOption = "auto",
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = 32,
    lr: LrOption = None,
    optimizer: OptimizerOption = "sgd",
    schedule: ScheduleOption = "cosine",
    momentum: MomentumOption = 0.9,
    weight_decay: WeightDecayOption = 0.0,
    warmup_steps: WarmupStepsOption = 0,
    grad_accum: GradAccumOption = 1,
    max_grad_norm: MaxGradNormOption = None,
    ste: SteOption = "sr",
    lambda_w: LambdaWOption = 2e-4,
    mask_interval: MaskIntervalOption = 1,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    shard: ShardOption = "ddp",
    activation_checkpointing: ActivationCheckpointingOption = False,
    save_every: SaveEveryOption = 0,
    resume: ResumeOption = False,
    seed: SeedOption = 0,
    no_dense: NoDenseOption = False,
    max_length: MaxLengthOption = 128,
    temperature: TemperatureOption = 2.0,
    log_every: LogEveryOption = 0,
    bn: BnOption = "train",
    bn_batches: BnBatchesOption = 50,
    eval_data: EvalDataOption = None,
    eval_split: EvalSplitOption = 0.05,
    eval_every: EvalEveryOption = 0,
    arch: FinetuneArchOption = None,
    model_class: ModelClassOption = "auto",
    trust: TrustOption = False,
    output: OutputOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Fine-tune a pruned checkpoint with SR-STE and write the recovered nmcli/1 checkpoint.

    The forward pass uses the masked weights `M(W) ⊙ W`; the dense W gets the straight-through gradient
    plus `lambda_w (1 - M) ⊙ W`, and the masks are recomputed from W every --mask-interval steps. Runs
    unchanged under torchrun (DistributedDataParallel, or FSDP2 with --shard fsdp). BatchNorm statistics are re-estimated with
    the final masks before every save (--bn-batches); the model is evaluated in eval mode on held-out
    data (--eval-data, else --eval-split of the training data) before, every --eval-every steps and
    after. Ctrl-C stops at the next step boundary and saves a checkpoint that --resume continues exactly.
    """
    from nmcli.commands.finetune import finetune_config, run_finetune
    from nmcli.trust import remember_command_line

    remember_command_line([checkpoint, arch, teacher], trust=trust)  # the user's own code: later rebuilds may run it
    config = finetune_config(ctx.params)  # every training option above, by name
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
            model_class=model_class,
        )
    if result.output is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    _render(result)
    if json_output:
        emit_json(result.to_json())
    if result.interrupted:
        raise typer.Exit(128 + (result.stopped_by or 2))  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


class _reporter:
    """Progress bar on a terminal and/or ``--log-every`` lines on stderr; yields the step callback.

    Off a terminal without ``--log-every``, plain lines (:func:`plain_progress`: at least every 10 s
    with the step, the loss and the elapsed time), so that a CI log shows the run is alive.
    """

    def __init__(self, bar: bool, log_every: int) -> None:
        self.bar, self.log_every = bar, log_every
        self._progress: Any = None
        self._task: Any = None
        self._plain = plain_progress("finetune") if not (bar or log_every) else None

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
        if self._plain is not None:
            self._plain(info.step, info.total, f"steps, loss {info.loss:.4f}, {info.steps_per_second:.2f} steps/s")
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
