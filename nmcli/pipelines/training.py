"""SR-STE fine-tuning: the training loop, its data, teacher, optimizer and schedule."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli.algorithms.distill import compute_loss
from nmcli.algorithms.sad import SadResult
from nmcli.algorithms.srste import DEFAULT_LAMBDA_W, SparseTraining
from nmcli.device import resolve_device
from nmcli.errors import (
    DataError,
    InputError,
    SourceError,
)
from nmcli.formats.checkpoint import Checkpoint, CheckpointMeta, history_record, save_checkpoint
from nmcli.formats.safetensors import sha256_file
from nmcli.formats.trainstate import TRAINSTATE_FORMAT, save_trainstate, trainstate_path
from nmcli.inputs import FLOAT_PRECISIONS, parse_input_spec
from nmcli.models.batchnorm import batchnorm_buffers, has_batchnorm, recalibrate_batchnorm, restore_buffers
from nmcli.models.data import Batch, TrainData, batches_of, check_batch_fits, load_data, split_data
from nmcli.models.evaluation import evaluate
from nmcli.models.sources import (
    fixed_graph_kind,
)
from nmcli.pipelines.distributed import (
    SHARD_MODES,
    StopRequest,
    agreed_signal,
    load_sharded,
    remove_sharded,
    save_sharded,
    shard_model,
    sharded_state_path,
)
from nmcli.pipelines.materialize import StoredCheckpoint, materialize
from nmcli.pipelines.sad import compare_masks
from nmcli.pipelines.shardedout import drain, is_directory_output, tied_aliases, write_directory
from nmcli.pipelines.trainstart import RESUME_KEYS, Start, load_start, load_teacher, meta_start, meta_teacher

DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
BN_MODES = ("train", "freeze")


@dataclass
class FinetuneConfig:
    """Options of one fine-tuning run (DESIGN.md section 1, ``nmcli finetune``).

    ``steps`` counts optimizer steps; when it is None, ``epochs`` (default 1) passes over the data
    set it. ``batch_size`` is the global batch of one micro-step (over all processes); an optimizer
    step sees ``batch_size * grad_accum`` examples. ``lr`` None is 0.01 for SGD and 1e-4 for AdamW.
    ``bn_batches`` 0 turns the BatchNorm re-estimation off; ``eval_split`` 0 turns the held-out
    split off (``eval_data`` replaces it); ``eval_every`` 0 evaluates only before and after.
    """

    data: str
    teacher: str = "auto"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: float | None = None
    ste: str = "sr"
    lambda_w: float = DEFAULT_LAMBDA_W
    mask_interval: int = 1
    device: str = "auto"
    precision: str = "fp32"
    save_every: int = 0
    seed: int = 0
    no_dense: bool = False
    max_length: int = 128
    temperature: float = 2.0
    log_every: int = 0
    bn: str = "train"
    bn_batches: int = 50
    eval_data: str | None = None
    eval_split: float = 0.05
    eval_every: int = 0
    shard: str = "ddp"
    activation_checkpointing: bool = False

    @property
    def effective_lambda(self) -> float:
        return 0.0 if self.ste == "plain" else self.lambda_w

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        """Check option values before any work is done.

        Raises:
            InputError: an option is out of range, not finite, or unknown.
        """
        problems = [p for p in (*self._choice_problems(), *self._number_problems()) if p]
        if problems:
            raise InputError("; ".join(problems))

    def _choice_problems(self) -> list[str]:
        choices = {
            "optimizer": tuple(DEFAULT_LR), "schedule": ("cosine", "constant"), "ste": ("sr", "plain"),
            "precision": tuple(FLOAT_PRECISIONS), "bn": BN_MODES,
            "shard": SHARD_MODES,
        }  # fmt: skip
        problems = [
            f"--{name} {getattr(self, name)!r}: choose {' or '.join(allowed)}"
            for name, allowed in choices.items()
            if getattr(self, name) not in allowed
        ]
        if self.steps is not None and self.epochs is not None:
            problems.append("give --steps or --epochs, not both")
        return problems

    def _number_problems(self) -> list[str]:
        def bad(name: str, value: float | None, low: float, high: float, open_low: bool = False) -> str:
            if value is None:
                return ""
            finite = math.isfinite(value)
            if finite and (value > low if open_low else value >= low) and value <= high:
                return ""
            bound = f"{'>' if open_low else '>='} {low:g} and <= {high:g}"
            return f"--{name.replace('_', '-')} {value:g} is {'not finite' if not finite else 'out of range'}: give a number {bound}"

        return [
            bad("steps", self.steps, 1, 1e9), bad("epochs", self.epochs, 0, 1e6, True),
            bad("batch_size", self.batch_size, 1, 1e7), bad("grad_accum", self.grad_accum, 1, 1e6),
            bad("mask_interval", self.mask_interval, 1, 1e9), bad("max_length", self.max_length, 1, 1e6),
            bad("warmup_steps", self.warmup_steps, 0, 1e9), bad("save_every", self.save_every, 0, 1e9),
            bad("log_every", self.log_every, 0, 1e9), bad("eval_every", self.eval_every, 0, 1e9),
            bad("bn_batches", self.bn_batches, 0, 1e7), bad("lr", self.lr, 0, 1e3, True),
            bad("lambda_w", self.lambda_w, 0, 1e3), bad("weight_decay", self.weight_decay, 0, 1e3),
            bad("momentum", self.momentum, 0, 1), bad("max_grad_norm", self.max_grad_norm, 0, 1e9, True),
            bad("temperature", self.temperature, 0, 1e3, True), bad("eval_split", self.eval_split, 0, 0.5),
        ]  # fmt: skip


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimizer step (reported by rank 0)."""

    step: int
    total: int
    loss: float
    lr: float
    steps_per_second: float
    elapsed: float


@dataclass
class FinetuneResult:
    """What a run produced. ``sad_vs_start`` compares the starting and final masks.

    ``evals`` holds ``before``, ``after`` and ``during`` (a list of ``{"step", ...metrics}``) when
    the run evaluated; ``notes`` say what the run decided on its own (held-out split, BN).
    """

    output: Path | None
    steps: int
    total_steps: int
    final_loss: float | None
    sad_vs_start: SadResult
    seconds: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)
    evals: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bn: dict[str, Any] = field(default_factory=dict)
    stopped_by: int | None = None  # the signal that interrupted the run (SIGINT for Ctrl-C or on_step)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "final_loss": self.final_loss,
            "sad_vs_start": self.sad_vs_start.sad,
            "sad_vs_start_normalized": self.sad_vs_start.normalized,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "eval": self.evals,
            "bn": self.bn,
            "notes": self.notes,
        }


StepCallback = Callable[[StepInfo], None]
EvalCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _steps_per_epoch(data: TrainData, cfg: FinetuneConfig) -> int | None:
    """Micro-batches per epoch (global), or None for iterable data without a length."""
    if data.map_style:
        n = len(data)
        if n < cfg.batch_size:
            raise DataError(f"--data {data.spec} has {n} examples, fewer than --batch-size {cfg.batch_size}")
        return n // cfg.batch_size
    try:
        return len(data)
    except TypeError:
        return None


def _micro_batches(data: TrainData, cfg: FinetuneConfig, dist: _Dist, start: int) -> Iterator[Batch]:
    """The micro-batches of this rank, from global micro-batch ``start`` on, epoch after epoch.

    Map-style data is shuffled per epoch with ``seed + epoch`` by a DistributedSampler; rank ``r``
    takes every ``world``-th example of the permutation, so the ``i``-th micro-batches of all ranks
    together hold exactly the examples of the single-process run's ``i``-th batch.
    """
    if data.map_style:
        from torch.utils.data.distributed import DistributedSampler

        per_rank = cfg.batch_size // dist.world
        per_epoch = len(data) // cfg.batch_size
        sampler: DistributedSampler[Any] = DistributedSampler(
            data.examples, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        epoch, position = divmod(start, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            order = list(sampler)
            for i in range(position, per_epoch):
                yield data.take(order[i * per_rank : (i + 1) * per_rank])
            epoch, position = epoch + 1, 0
    skip = start
    while True:
        produced = False
        for batch in data.iter_batches():
            produced = True
            if skip:
                skip -= 1
                continue
            yield batch.shard(dist.rank, dist.world)
        if not produced:
            raise DataError(f"--data {data.spec} produced no batches")


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW; weight decay only on weights of two or more dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.effective_lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.effective_lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _precision(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    if cfg.precision == "fp32":
        return None, False
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise InputError("--precision fp16 needs --device cuda; on the CPU use --precision bf16")
        return torch.float16, True
    return torch.bfloat16, False


def _history_args(checkpoint: str, cfg: FinetuneConfig, arch: str | None, model_class: str) -> dict[str, Any]:
    args = {k: v for k, v in asdict(cfg).items()}
    args.update({"checkpoint": checkpoint, "arch": arch, "lr": cfg.effective_lr})
    if model_class != "auto":
        args["model_class"] = model_class
    return args


@dataclass
class _Data:
    train: TrainData
    evaluation: list[Batch] | None
    total: int
    notes: list[str]


def _load_data(cfg: FinetuneConfig, start: Checkpoint, model: nn.Module, arch: str | None) -> _Data:
    source_spec = arch or start.meta.source.arch or start.meta.source.spec
    input_shape = parse_input_spec(start.meta.input_spec).tensors[0].shape if start.meta.input_spec else None
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) and cfg.teacher == "none"
    kwargs = {"source_spec": source_spec, "input_shape": input_shape, "max_length": cfg.max_length, "causal_lm": causal}
    data = load_data(cfg.data, **kwargs)  # type: ignore[arg-type]
    notes: list[str] = []
    evaluation: list[Batch] | None = None
    if cfg.eval_data:
        try:
            held = load_data(cfg.eval_data, **kwargs)  # type: ignore[arg-type]
        except DataError as exc:
            raise DataError(str(exc).replace("--data", "--eval-data", 1)) from exc
        evaluation = batches_of(held, cfg.batch_size)
    elif cfg.eval_split > 0 and data.map_style and len(data) >= 2 * cfg.batch_size:
        count = max(1, round(len(data) * cfg.eval_split))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        data, held = split_data(data, order[:count])
        evaluation = batches_of(held, cfg.batch_size)
        notes.append(
            f"held out {count} of {count + len(data)} training examples ({100 * cfg.eval_split:g}%, --eval-split) "
            "to evaluate on; --eval-data SPEC evaluates on other data, --eval-split 0 trains on all"
        )
    elif cfg.eval_split > 0:
        notes.append("no held-out evaluation: the data is too small or has no length to split; pass --eval-data SPEC")
    per_epoch = _steps_per_epoch(data, cfg)
    if cfg.steps is not None:
        total = cfg.steps
    elif per_epoch is None:
        raise DataError(f"--data {cfg.data} is an iterable without a length: give --steps")
    else:
        total = max(1, math.ceil((cfg.epochs or 1.0) * per_epoch / cfg.grad_accum))
    return _Data(data, evaluation, total, notes)


def _bn_batches(data: TrainData, cfg: FinetuneConfig) -> list[Batch]:
    """The training batches BatchNorm statistics are re-estimated on: a fixed seeded order, never the RNG's."""
    if not data.map_style:
        return batches_of(data, cfg.batch_size, cfg.bn_batches)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
    count = min(cfg.bn_batches, math.ceil(len(order) / cfg.batch_size))
    return [data.take(order[i * cfg.batch_size : (i + 1) * cfg.batch_size]) for i in range(count)]


def _check_fits(
    model: nn.Module, teacher: nn.Module | None, batch: Batch, data: _Data, cfg: FinetuneConfig, autocast: Any
) -> None:
    """Run the student and the teacher once on the first training batch (and the student on the
    first held-out one), so data or a teacher that does not fit is exit 2 before training."""

    def first_line(exc: Exception) -> str:
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}"

    model.eval()
    with torch.no_grad(), autocast():
        check_batch_fits(model, batch, f"--data {cfg.data}")
        if data.evaluation:
            held = data.evaluation[0].to(_device_of(model))
            check_batch_fits(model, held, f"--eval-data {cfg.eval_data}" if cfg.eval_data else "the held-out data")
        if teacher is not None:
            kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
            try:
                teacher(*batch.args, **kwargs)
            except Exception as exc:
                raise SourceError(
                    f"the teacher (--teacher {cfg.teacher}) cannot run on --data {cfg.data} ({first_line(exc)}): "
                    "give a --teacher that takes the student's inputs, or --teacher none"
                ) from exc
        compute_loss(model, teacher, batch, data.train, cfg.temperature)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _set_train_mode(model: nn.Module, bn: str) -> None:
    """Train mode; with ``bn == "freeze"`` BatchNorm layers stay in eval mode (fixed running statistics)."""
    model.train()
    if bn == "freeze":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@dataclass
class Session:
    """Everything one run holds between its parts."""

    cfg: FinetuneConfig
    dist: _Dist
    device: torch.device
    model: nn.Module
    trained: nn.Module
    sparse: SparseTraining
    teacher: nn.Module | None
    data: _Data
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    autocast: Any
    start: Start
    record_base: CheckpointMeta
    history_args: dict[str, Any]
    out: Path
    ckpt_path: Path
    input_sha: str
    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: dict[str, Any] = field(default_factory=dict)
    bn_used: int = 0
    fsdp: bool = False  # the model is sharded with FSDP2 (--shard fsdp under torchrun)


def _check_trainable(model: nn.Module, ckpt: Checkpoint, arch: str | None) -> None:
    """Refuse a model whose graph was fixed when saved (TorchScript, torch.export): SR-STE needs to
    re-parametrize its weights and run it in training mode.

    Raises:
        InputError: such a model, with the fix (``--arch`` building the architecture in Python).
    """
    kind = fixed_graph_kind(model)
    if kind is not None:
        raise InputError(
            f"the checkpoint's source {arch or ckpt.meta.source.arch or ckpt.meta.source.spec} is a {kind} model, "
            f"whose graph was fixed when it was saved: SR-STE must re-parametrize its weights and train it, which "
            f"{kind} does not allow; pass --arch py:module:factory (or hf:, torchvision:, timm:) that builds the same "
            "architecture in Python"
        )


def setup_session(
    start_ckpt: Checkpoint, ckpt_path: Path, out: Path, resume_from: Path | None, cfg: FinetuneConfig,
    dist: _Dist, arch: str | None, trust: bool, stored: StoredCheckpoint | None = None, model_class: str = "auto",
) -> Session:  # fmt: skip
    """Everything a run needs before its first step.

    ``stored`` (``--shard fsdp`` under torchrun: :func:`~nmcli.pipelines.trainstart.open_start`) takes the
    meta path: the model is built on the meta device, sharded, and each rank fills only its own shards.
    ``model_class`` (``--model-class``) is the class of an ``hf:`` ``arch`` or ``--teacher``.
    """
    device = torch.device(resolve_device(cfg.device, current=dist.local_rank))  # cuda: this process's GPU
    if cfg.batch_size % dist.world:
        raise InputError(
            f"--batch-size {cfg.batch_size} (the global batch) does not split evenly over {dist.world} processes"
        )
    autocast_dtype, use_scaler = _precision(cfg, device)
    fsdp = cfg.shard == "fsdp" and dist.world > 1
    options = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if stored is not None and fsdp:
        begin = meta_start(stored, resume_from, out, options, arch, trust, model_class)
    else:
        begin = load_start(start_ckpt, resume_from, out, options, arch, trust, model_class)
    _check_trainable(begin.model, start_ckpt, arch)
    data = _load_data(cfg, start_ckpt, begin.model, arch)
    if cfg.shard == "fsdp" and dist.world == 1:
        data.notes.append(
            "--shard fsdp shards over the processes of torchrun; this is one process, so the model ran whole "
            "(torchrun --nproc_per_node N -m nmcli finetune ... --shard fsdp)"
        )
    if begin.state is not None and int(begin.state["total_steps"]) != data.total:
        raise InputError(
            f"--resume: the interrupted run had {begin.state['total_steps']} steps, this one {data.total}: "
            "use the same --steps/--epochs"
        )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype))
        if autocast_dtype is not None
        else contextlib.nullcontext
    )
    probe = next(_micro_batches(data.train, cfg, dist, begin.step * cfg.grad_accum)).to(device)
    model, sparse, teacher = _prepare_models(begin, start_ckpt, cfg, device, fsdp, arch, trust, model_class)
    if begin.rows is None:
        _check_fits(model, teacher, probe, data, cfg, autocast)
    if fsdp:  # bf16: FSDP2's mixed precision (fp32 master weights) replaces autocast
        _shard(model, sparse, teacher, begin, cfg, autocast_dtype is not None, device)
        autocast = contextlib.nullcontext
    optimizer, scheduler, scaler = _optimizer_parts(model, cfg, data.total, device, use_scaler, begin, out, fsdp)
    if begin.rows is not None:  # the meta path's models exist only now; FSDP2's lazy initialisation (in the
        # first forward) must come after the optimizer is built, or the optimizer steps on stale parameters
        _check_fits(model, teacher, probe, data, cfg, autocast)
    trained: nn.Module = model
    if dist.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    meta = start_ckpt.meta
    record_base = CheckpointMeta(meta.source, meta.pattern, meta.layers, meta.input_spec, begin.history, meta.method)
    session = Session(
        cfg, dist, device, model, trained, sparse, teacher, data, optimizer, scheduler, scaler, autocast, begin,
        record_base, _history_args(str(ckpt_path), cfg, arch, model_class), out, ckpt_path, sha256_file(ckpt_path),
        begin.step,
    )  # fmt: skip
    session.fsdp = fsdp
    if begin.state is not None:
        session.evals = dict(begin.state.get("evals") or {})
    return session


def _prepare_models(
    begin: Start, start_ckpt: Checkpoint, cfg: FinetuneConfig, device: torch.device, fsdp: bool, arch: str | None,
    trust: bool, model_class: str,
) -> tuple[nn.Module, SparseTraining, nn.Module | None]:  # fmt: skip
    """The student under SR-STE and the teacher, on ``device`` (meta-path skeletons stay on the meta device)."""
    if begin.rows is not None:
        teacher, begin.teacher_rows = meta_teacher(cfg.teacher, begin, arch=arch, trust=trust, model_class=model_class)
    else:
        teacher = load_teacher(cfg.teacher, begin.teacher_ckpt, arch=arch, trust=trust, model_class=model_class)
    torch.manual_seed(cfg.seed)
    sparse = SparseTraining(
        begin.model, begin.names.model_layers(start_ckpt.meta.layers), begin.masks, lambda_w=cfg.effective_lambda,
        mask_interval=cfg.mask_interval, refine_in_backward=False, step=begin.step,
    )  # fmt: skip
    model = begin.model if begin.rows is not None else begin.model.to(device)
    if teacher is not None and begin.teacher_rows is None:
        teacher.to(device)
    return model, sparse, teacher


def _shard(
    model: nn.Module, sparse: SparseTraining, teacher: nn.Module | None, begin: Start, cfg: FinetuneConfig,
    bf16: bool, device: torch.device,
) -> None:  # fmt: skip
    """``fully_shard`` the student and teacher; on the meta path, then give each rank its shards from the files."""
    if has_batchnorm(model):
        raise InputError(
            "--shard fsdp: the model has BatchNorm, whose statistics FSDP does not gather: use --shard ddp"
        )
    shard_model(model, sparse, teacher, bf16=bf16, checkpointing=cfg.activation_checkpointing)
    if begin.rows is not None:
        materialize(model, begin.rows, begin.masks, device, str(begin.rows.path))
    if teacher is not None and begin.teacher_rows is not None:
        materialize(teacher, begin.teacher_rows, {}, device, f"the teacher ({begin.teacher_rows.path})")


def _optimizer_parts(
    model: nn.Module, cfg: FinetuneConfig, total: int, device: torch.device, use_scaler: bool, begin: Start,
    out: Path, fsdp: bool,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler | None]:  # fmt: skip
    """The optimizer, schedule and loss scaler, with their state restored when resuming."""
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule)
    )
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    if begin.state is not None:
        if fsdp:  # the sharded weights and optimizer state: each rank reads its own shards
            load_sharded(sharded_state_path(out), model, optimizer)
        else:
            optimizer.load_state_dict(begin.state["optimizer"])
        scheduler.load_state_dict(begin.state["scheduler"])
        if scaler is not None and begin.state.get("scaler"):
            scaler.load_state_dict(begin.state["scaler"])
        torch.set_rng_state(begin.state["rng"])
    return optimizer, scheduler, scaler


def evaluate_session(session: Session) -> dict[str, float] | None:
    """Evaluate on the held-out data (rank 0; every rank runs a sharded model's forward); the metrics on rank 0."""
    if not session.data.evaluation or not (session.dist.main or session.fsdp):
        return None
    metrics = evaluate(session.model, session.teacher, session.data.evaluation, session.device)
    _set_train_mode(session.model, session.cfg.bn)
    return metrics if session.dist.main else None


def _train_step(session: Session, stream: Iterator[Batch]) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (over all processes)."""
    cfg, device = session.cfg, session.device
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        batch = next(stream).to(device)
        last = micro == cfg.grad_accum - 1
        ddp = session.dist.world > 1 and not session.fsdp
        sync = session.trained.no_sync() if ddp and not last else contextlib.nullcontext()  # type: ignore[operator]
        with sync:
            with session.autocast():
                loss = compute_loss(session.trained, session.teacher, batch, session.data.train, cfg.temperature)
            scaled = loss / cfg.grad_accum
            (session.scaler.scale(scaled) if session.scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    if session.scaler is not None:
        session.scaler.unscale_(session.optimizer)
    session.sparse.add_refinement()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in session.model.parameters() if p.requires_grad], cfg.max_grad_norm)
    if session.scaler is not None:
        session.scaler.step(session.optimizer)
        session.scaler.update()
    else:
        session.optimizer.step()
    session.scheduler.step()
    session.sparse.step()
    session.optimizer.zero_grad(set_to_none=True)
    mean_loss = loss_sum / cfg.grad_accum
    if session.dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(mean_loss)
        mean_loss /= session.dist.world
    return float(mean_loss)


def train_loop(session: Session, on_step: StepCallback | None, on_eval: EvalCallback | None) -> int | None:
    """The training loop; returns the signal that interrupted it (it then stopped at a step boundary), else None."""
    cfg, total = session.cfg, session.data.total
    stream = _micro_batches(session.data.train, cfg, session.dist, session.step * cfg.grad_accum)
    _set_train_mode(session.model, cfg.bn)
    started, first = time.perf_counter(), session.step
    with StopRequest() as stop:
        while session.step < total:
            lr = session.optimizer.param_groups[0]["lr"]
            loss = _train_step(session, stream)
            session.step += 1
            if not math.isfinite(loss):
                raise DataError(f"the loss became {loss} at step {session.step}: lower --lr or set --max-grad-norm")
            session.losses.append(loss)
            if cfg.eval_every and session.step % cfg.eval_every == 0 and session.step < total:
                metrics = evaluate_session(session)
                if metrics is not None:
                    session.evals.setdefault("during", []).append({"step": session.step, **metrics})
                    if on_eval is not None:
                        on_eval(session.step, metrics)
            if cfg.save_every and session.step % cfg.save_every == 0 and session.step < total:
                save_progress(session, final=False)
            try:
                if on_step is not None and session.dist.main:
                    elapsed = time.perf_counter() - started
                    rate = (session.step - first) / max(elapsed, 1e-9)
                    on_step(StepInfo(session.step, total, loss, lr, rate, elapsed))
            except KeyboardInterrupt as exc:
                stop.requested = True
                stop.signum = stop.signum or getattr(exc, "signum", signal.SIGINT)
            asked = (stop.signum or signal.SIGINT) if stop.requested else None
            if session.dist.world > 1:  # a signal on any rank stops all of them at this step
                asked = agreed_signal(asked, session.device)
            if asked is not None and session.step < total:
                return asked
    return None


def save_progress(session: Session, *, final: bool) -> None:
    """Write the checkpoint (and, unless ``final``, the resume sidecar), BN statistics re-estimated for it.

    Rank 0 writes; under ``--shard fsdp`` every rank takes part in gathering the weights one tensor at
    a time and writes its shards of the resumable state (``OUT.dcp``).
    """
    if not session.dist.main and not session.fsdp:
        return
    cfg, sparse, model, main = session.cfg, session.sparse, session.model, session.dist.main
    train_buffers = batchnorm_buffers(model)
    masks = sparse.final_masks()
    if final:
        sparse.update_masks()
    recalibrate = cfg.bn_batches > 0 and has_batchnorm(model)
    if recalibrate:
        batches = [b.to(session.device) for b in _bn_batches(session.data.train, cfg)]
        session.bn_used = recalibrate_batchnorm(model, batches)
        _set_train_mode(model, cfg.bn)
    if final and session.data.evaluation:
        after = evaluate_session(session)
        if after is not None:
            session.evals["after"] = after
    if is_directory_output(session.ckpt_path, session.out):
        _write_directory(session, final, masks, recalibrate)  # streamed: gather, write, free
    else:  # under the checkpoint's names (session.start.names), as the input has them
        names = session.start.names
        tensors = names.stored_state(sparse.state_dict(masks, keep=main))
        dense = names.stored_state(sparse.dense_weights(keep=main)) if not (final and cfg.no_dense) else {}
        if main:
            meta = _output_meta(session, final, masks, recalibrate)
            result = Checkpoint(tensors=tensors, masks=names.stored_state(masks), meta=meta, dense=dense)
            same = session.out.resolve() == session.ckpt_path.resolve()
            save_checkpoint(result, session.out, force=True, inputs=[] if same else [session.ckpt_path])
    if session.fsdp and not final:
        save_sharded(sharded_state_path(session.out), session.model, session.optimizer)
    if not main:
        return
    sidecar = trainstate_path(session.out)
    if final:
        sidecar.unlink(missing_ok=True)
        remove_sharded(sharded_state_path(session.out))
        return
    restore_buffers(model, train_buffers)  # training goes on with its own statistics
    save_trainstate(sidecar, _trainstate(session, train_buffers))


def _write_directory(session: Session, final: bool, masks: dict[str, torch.Tensor], recalibrate: bool) -> None:
    """Stream the model into a sharded checkpoint directory in the input's layout, under its names: every
    rank drains the gathers (one tensor at a time), rank 0 writes each tensor and drops it."""
    keep, names = session.dist.main, session.start.names
    state = names.stored_items(session.sparse.iter_state(masks, keep=keep))
    dense = iter(()) if final and session.cfg.no_dense else names.stored_items(session.sparse.iter_dense(keep=keep))
    if not keep:
        drain(state, dense)
        return
    same = session.out.resolve() == session.ckpt_path.resolve()
    meta = _output_meta(session, final, masks, recalibrate)
    skip = {names.stored(alias) for alias in tied_aliases(session.model)}
    inputs = [] if same else [session.ckpt_path]
    stored = names.stored_state(masks)
    write_directory(session.out, session.ckpt_path, state, dense, stored, meta, skip=skip, inputs=inputs)


def _output_meta(session: Session, final: bool, masks: dict[str, torch.Tensor], recalibrate: bool) -> CheckpointMeta:
    """The output's metadata: the input's, with this run's history record (a partial one unless ``final``)."""
    cfg = session.cfg
    loss = session.losses[-1] if session.losses else None
    sad = compare_masks(session.start.start_masks, masks)
    metrics: dict[str, Any] = {
        "steps": session.step, "final_loss": loss, "sad_vs_start": sad.sad, "sad_vs_start_normalized": sad.normalized,
        "bn": cfg.bn, "bn_recalibrated_batches": session.bn_used if recalibrate else 0,
        "eval_before": session.evals.get("before"), "eval_after": session.evals.get("after"),
    }  # fmt: skip
    if not final:
        metrics.update({"partial": True, "total_steps": session.data.total})
    history = [*session.start.history, history_record("finetune", session.history_args, metrics)]
    return replace(session.record_base, history=history)


def _trainstate(session: Session, train_buffers: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "format": TRAINSTATE_FORMAT,
        "step": session.step,
        "total_steps": session.data.total,
        "optimizer": None if session.fsdp else session.optimizer.state_dict(),  # fsdp: in OUT.dcp
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler is not None else None,
        "masks": session.sparse.masks(),
        "start_masks": {k: v.cpu() for k, v in session.start.start_masks.items()},
        "history": session.start.history,
        "rng": torch.get_rng_state(),
        "config": {k: getattr(session.cfg, k) for k in RESUME_KEYS},
        "input": str(session.ckpt_path),
        "input_sha256": session.input_sha,
        "train_buffers": {k: v.cpu() for k, v in train_buffers.items()},
        "evals": {k: v for k, v in session.evals.items() if k != "after"},
    }
