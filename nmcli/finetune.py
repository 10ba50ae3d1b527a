"""``nmcli finetune``: SR-STE sparse fine-tuning with distillation, on one process or many (DDP).

The run starts from the checkpoint's dense weights when it has them (``prune --keep-dense``), else
from its effective weights, and rebuilds the architecture from the checkpoint's source (``--arch``
overrides). Every pruned weight is trained with SR-STE (:mod:`nmcli.srste`): the forward pass uses
``M(W) ⊙ W``, the optimizer steps on the dense ``W`` with the gradient
``grad(W~) + lambda_w * (1 - M) ⊙ W``, and the masks are recomputed from ``W`` every
``mask_interval`` steps. The sparse-refined term is added once per optimizer step, after the
gradients of all micro-batches (``grad_accum``) and all processes are summed and averaged and after
fp16 loss scaling is undone, so it is never repeated or scaled; weight decay (on weights of two or
more dimensions only, never biases or norms) is the optimizer's own and is applied once, to ``W``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (nccl on
CUDA, gloo on CPU); ``batch_size`` is the global batch, split evenly over the processes, and each
global batch holds the same examples as the single-process run's, so both runs compute the same
update. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.checkpoint import Checkpoint, CheckpointMeta, history_record, load_checkpoint, save_checkpoint
from nmcli.data import Batch, TrainData, load_data
from nmcli.errors import BackendUnavailableError, DataError, InputError, NmcliError, SourceError
from nmcli.inputs import FLOAT_PRECISIONS, parse_input_spec
from nmcli.io import atomic_write_bytes, check_output_path
from nmcli.sad import SadResult, compare_masks
from nmcli.sources import default_output_path, load_model, load_source_model, model_from_checkpoint
from nmcli.srste import DEFAULT_LAMBDA_W, SparseTraining

TRAINSTATE_FORMAT = "nmcli-trainstate/1"
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
# Options that must not change between a run and its --resume.
_RESUME_KEYS = ("data", "batch_size", "grad_accum", "optimizer", "schedule", "ste", "mask_interval", "seed")


@dataclass
class FinetuneConfig:
    """Options of one fine-tuning run (DESIGN.md section 1, ``nmcli finetune``).

    ``steps`` counts optimizer steps; when it is None, ``epochs`` (default 1) passes over the data
    set it. ``batch_size`` is the global batch of one micro-step (over all processes); an optimizer
    step sees ``batch_size * grad_accum`` examples. ``lr`` None is 0.01 for SGD and 1e-4 for AdamW.
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

    @property
    def effective_lambda(self) -> float:
        return 0.0 if self.ste == "plain" else self.lambda_w

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        """Check option values before any work is done.

        Raises:
            InputError: an option is out of range or unknown.
        """
        problems = []
        if self.optimizer not in DEFAULT_LR:
            problems.append(f"--optimizer {self.optimizer!r}: choose sgd or adamw")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"--schedule {self.schedule!r}: choose cosine or constant")
        if self.ste not in ("sr", "plain"):
            problems.append(f"--ste {self.ste!r}: choose sr or plain")
        if self.precision not in FLOAT_PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose fp32, bf16 or fp16")
        if self.steps is not None and self.epochs is not None:
            problems.append("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            problems.append("--steps must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            problems.append("--epochs must be positive")
        for name in ("batch_size", "grad_accum", "mask_interval", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("warmup_steps", "save_every", "log_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.lr is not None and self.lr <= 0:
            problems.append("--lr must be positive")
        if self.lambda_w < 0 or self.weight_decay < 0 or self.momentum < 0:
            problems.append("--lambda-w, --weight-decay and --momentum must not be negative")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append("--max-grad-norm must be positive")
        if self.temperature <= 0:
            problems.append("--temperature must be positive")
        if problems:
            raise InputError("; ".join(problems))


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
    """What a run produced. ``sad_vs_start`` compares the starting and final masks."""

    output: Path | None
    steps: int
    total_steps: int
    final_loss: float | None
    sad_vs_start: SadResult
    seconds: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "sad_vs_start": self.sad_vs_start.sad,
            "sad_vs_start_normalized": self.sad_vs_start.normalized,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }


StepCallback = Callable[[StepInfo], None]


def trainstate_path(output: str | os.PathLike[str]) -> Path:
    """The sidecar with optimizer/scheduler state next to a resumable checkpoint."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".safetensors") + ".trainstate.pt")


# --------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False): use --device cpu"
            )
        if name == "cuda":
            return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from exc


# --------------------------------------------------------------------------------------------
# Losses


def _primary(out: Any) -> torch.Tensor:
    """The main output tensor: logits, else the last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"cannot find an output tensor in the model's {type(out).__name__} output")


def _has_logits(out: Any, targets: torch.Tensor | None) -> bool:
    """Whether the output is class scores (KL distillation) rather than features/regression (MSE)."""
    if getattr(out, "logits", None) is not None:
        return True
    if getattr(out, "last_hidden_state", None) is not None:
        return False
    return targets is None or not targets.is_floating_point()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``[B, T, ...]`` over the positions where ``mask`` ``[B, T]`` is set."""
    if mask is None or values.dim() < 2 or tuple(mask.shape) != tuple(values.shape[:2]):
        return values.mean()
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    per_position = values.numel() // max(1, mask.numel())
    return (values * weights).sum() / (weights.sum() * per_position).clamp_min(1.0)


def task_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (class scores on the last axis), MSE for float targets."""
    output = output.float()
    if targets.is_floating_point():
        if tuple(output.shape) != tuple(targets.shape):
            raise DataError(
                f"float targets have shape {tuple(targets.shape)} but the model outputs {tuple(output.shape)}: "
                "regression targets must match the output"
            )
        return F.mse_loss(output, targets.to(output.dtype))
    if tuple(output.shape[:-1]) != tuple(targets.shape):
        raise DataError(
            f"integer targets have shape {tuple(targets.shape)} but the model outputs {tuple(output.shape)}: "
            "class targets need one index per output row"
        )
    valid = targets[targets != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= output.shape[-1]):
        raise DataError(
            f"integer targets range over [{int(valid.min())}, {int(valid.max())}] but the model has "
            f"{output.shape[-1]} outputs: targets must be class indices"
        )
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1).long(), ignore_index=-100)


def distill_loss(
    student: Any, teacher: Any, targets: torch.Tensor | None, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Distillation: KL with temperature on logits (times ``T**2``), MSE on hidden states/regression outputs."""
    s, t = _primary(student).float(), _primary(teacher).float()
    if s.shape != t.shape:
        raise DataError(
            f"the teacher outputs {tuple(t.shape)} but the student {tuple(s.shape)}: use a matching --teacher"
        )
    if _has_logits(student, targets):
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        return _masked_mean(kl, mask) * temperature**2
    return _masked_mean((s - t).pow(2), mask)


def compute_loss(
    model: nn.Module, teacher: nn.Module | None, batch: Batch, data: TrainData, temperature: float
) -> torch.Tensor:
    """Task loss (when the batch has targets or the model returns a loss) plus distillation (with a teacher)."""
    out = model(*batch.args, **batch.kwargs)
    loss: torch.Tensor | None = None
    if data.loss is not None:
        loss = data.loss(out, batch.targets)
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    elif batch.targets is not None:
        loss = task_loss(_primary(out), batch.targets)
    if teacher is not None:
        kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
        with torch.no_grad():
            t_out = teacher(*batch.args, **kwargs)
        mask = batch.kwargs.get("attention_mask")
        d = distill_loss(out, t_out, batch.targets, temperature, mask)
        loss = d if loss is None else loss + d
    if loss is None:
        raise DataError(
            f"--data {data.spec} has no targets and there is no teacher, so there is nothing to train toward: "
            "use --teacher auto (distill from the dense model) or give targets"
        )
    return loss


# --------------------------------------------------------------------------------------------
# Data order


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


# --------------------------------------------------------------------------------------------
# Teacher


def load_teacher(spec: str, ckpt: Checkpoint, *, arch: str | None = None, trust: bool = False) -> nn.Module | None:
    """The teacher for ``--teacher auto|none|MODEL``.

    ``auto`` is the dense model the checkpoint came from: its stored dense weights when it has them
    and was never fine-tuned, else its source rebuilt with the source's own weights.
    """
    if spec == "none":
        return None
    if spec != "auto":
        return _frozen(load_model(spec, trust=trust).model)
    finetuned = any(record.get("command") == "finetune" for record in ckpt.meta.history)
    if ckpt.dense and not finetuned:
        return _frozen(model_from_checkpoint(ckpt, arch=arch, trust=trust, weights="dense"))
    ref = ckpt.meta.source
    try:
        loaded = load_source_model(ref, arch=arch, trust=trust)
    except NmcliError as exc:
        if ckpt.dense:
            return _frozen(model_from_checkpoint(ckpt, arch=arch, trust=trust, weights="dense"))
        raise SourceError(
            f"--teacher auto cannot rebuild the dense model from {ref.spec} ({exc}); "
            "pass --teacher MODEL, or --teacher none to train on targets alone"
        ) from exc
    if loaded.checkpoint is not None:
        raise SourceError(
            f"--teacher auto: the source {ref.spec} is itself a sparse checkpoint: pass --teacher MODEL or none"
        )
    return _frozen(loaded.model)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Optimizer and schedule


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


# --------------------------------------------------------------------------------------------
# The run


def _precision(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    if cfg.precision == "fp32":
        return None, False
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise InputError("--precision fp16 needs --device cuda; on the CPU use --precision bf16")
        return torch.float16, True
    return torch.bfloat16, False


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue(), force=True)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"--resume: {path} is not readable training state ({exc}): run again without --resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != TRAINSTATE_FORMAT:
        raise InputError(f"--resume: {path} is not nmcli training state: run again without --resume")
    return state


def _find_resume(output: Path, checkpoint: Path) -> Path:
    for candidate in (output, checkpoint):
        if candidate.is_file() and trainstate_path(candidate).is_file():
            return candidate
    raise InputError(
        f"--resume: no resumable checkpoint ({output} with {trainstate_path(output).name}): "
        "run without --resume (use --save-every N to write resumable checkpoints)"
    )


def _history_args(checkpoint: str, cfg: FinetuneConfig, arch: str | None) -> dict[str, Any]:
    args = {k: v for k, v in asdict(cfg).items()}
    args.update({"checkpoint": checkpoint, "arch": arch, "lr": cfg.effective_lr})
    return args


def run_finetune(
    checkpoint: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    arch: str | None = None,
    trust: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> FinetuneResult:
    """``nmcli finetune``: train the checkpoint's sparse model with SR-STE and write the result.

    Args:
        checkpoint: the nmcli/1 checkpoint to start from.
        config: the run's options.
        output: the output checkpoint (default ``<checkpoint>-ft.safetensors`` beside it).
        force: overwrite an existing output.
        arch: architecture source overriding the checkpoint's.
        trust: allow unpickling a pickled-module source.
        resume: continue from the resumable checkpoint at ``output`` (or ``checkpoint``) and its sidecar.
        on_step: called on rank 0 after every optimizer step; raising KeyboardInterrupt in it
            stops the run like Ctrl-C does.

    Raises:
        InputError, DataError, CheckpointError, SourceError: bad options, data, or files (exit 2).
        BackendUnavailableError: a missing device or optional package (exit 3).

    Ctrl-C (KeyboardInterrupt) during training saves a resumable checkpoint at ``output`` and
    returns a result with ``interrupted`` set.
    """
    started = time.perf_counter()
    cfg = config
    cfg.validate()
    ckpt_path = Path(checkpoint)
    out = Path(output) if output else default_output_path(str(ckpt_path), "ft")
    check_output_path(out, force=force or resume, inputs=[] if resume else [ckpt_path])
    if out.resolve() == ckpt_path.resolve() and not resume:
        raise InputError(f"output {out} is also the input: choose another -o")
    start = load_checkpoint(ckpt_path)
    if not start.masks:
        raise InputError(f"{ckpt_path} has no pruned layers: prune it first (nmcli prune)")

    dist = _init_distributed("cuda" if cfg.device.startswith("cuda") else "cpu")
    try:
        device = _resolve_device(cfg.device, dist.local_rank)
        if cfg.batch_size % dist.world:
            raise InputError(
                f"--batch-size {cfg.batch_size} (the global batch) does not split evenly over {dist.world} processes"
            )
        autocast_dtype, use_scaler = _precision(cfg, device)

        state: dict[str, Any] | None = None
        if resume:
            source_path = _find_resume(out, ckpt_path)
            state = _load_state(trainstate_path(source_path))
            changed = [k for k in _RESUME_KEYS if state["config"].get(k) != getattr(cfg, k)]
            if changed:
                raise InputError(
                    f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ(s) from the "
                    "interrupted run: use the same options to resume"
                )
            partial = load_checkpoint(source_path)
            model = model_from_checkpoint(partial, arch=arch, trust=trust, weights="dense")
            masks_in_use: Mapping[str, torch.Tensor] = state["masks"]
            start_masks: Mapping[str, torch.Tensor] = state["start_masks"]
            base_history: list[dict[str, Any]] = list(state["history"])
            step0 = int(state["step"])
            teacher_ckpt = start if source_path == out else partial
        else:
            model = model_from_checkpoint(start, arch=arch, trust=trust, weights="dense")
            masks_in_use = start.masks
            start_masks = start.masks
            base_history = list(start.meta.history)
            step0 = 0
            teacher_ckpt = start

        source_spec = start.meta.source.arch or start.meta.source.spec
        if arch:
            source_spec = arch
        input_shape = None
        if start.meta.input_spec:
            first = parse_input_spec(start.meta.input_spec).tensors[0]
            input_shape = first.shape
        causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) and cfg.teacher == "none"
        data = load_data(
            cfg.data, source_spec=source_spec, input_shape=input_shape, max_length=cfg.max_length, causal_lm=causal
        )
        per_epoch = _steps_per_epoch(data, cfg)
        if cfg.steps is not None:
            total = cfg.steps
        elif per_epoch is None:
            raise DataError(f"--data {cfg.data} is an iterable without a length: give --steps")
        else:
            total = max(1, math.ceil((cfg.epochs or 1.0) * per_epoch / cfg.grad_accum))
        if resume and state is not None and int(state["total_steps"]) != total:
            raise InputError(
                f"--resume: the interrupted run had {state['total_steps']} steps, this one {total}: use the same --steps/--epochs"
            )
        teacher = load_teacher(cfg.teacher, teacher_ckpt, arch=arch, trust=trust)

        torch.manual_seed(cfg.seed)
        sparse = SparseTraining(
            model,
            start.meta.layers,
            masks_in_use,
            lambda_w=cfg.effective_lambda,
            mask_interval=cfg.mask_interval,
            refine_in_backward=False,
            step=step0,
        )
        model.to(device)
        if teacher is not None:
            teacher.to(device)

        autocast = (
            (lambda: torch.autocast(device.type, dtype=autocast_dtype))
            if autocast_dtype is not None
            else contextlib.nullcontext
        )
        # Check that the data fits the model before training starts (exit 2, not a traceback later).
        probe = next(_micro_batches(data, cfg, dist, step0 * cfg.grad_accum)).to(device)
        model.eval()
        try:
            with torch.no_grad(), autocast():
                compute_loss(model, teacher, probe, data, cfg.temperature)
        except NmcliError:
            raise
        except Exception as exc:
            raise DataError(
                f"--data {cfg.data} does not fit the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        model.train()

        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule)
        )
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])

        trained: nn.Module = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        history_args = _history_args(str(checkpoint), cfg, arch)
        record_base = CheckpointMeta(
            source=start.meta.source,
            pattern=start.meta.pattern,
            layers=start.meta.layers,
            input_spec=start.meta.input_spec,
            history=base_history,
            method=start.meta.method,
        )

        def save(step: int, final: bool, loss: float | None) -> None:
            if not dist.main:
                return
            masks = sparse.final_masks()
            sad = compare_masks(start_masks, masks)
            metrics: dict[str, Any] = {
                "steps": step,
                "final_loss": loss,
                "sad_vs_start": sad.sad,
                "sad_vs_start_normalized": sad.normalized,
            }
            if not final:
                metrics["partial"] = True
                metrics["total_steps"] = total
            meta = replace(record_base, history=[*base_history, history_record("finetune", history_args, metrics)])
            keep_dense = not (final and cfg.no_dense)
            result_ckpt = Checkpoint(
                tensors=sparse.state_dict(masks),
                masks=masks,
                meta=meta,
                dense=sparse.dense_weights() if keep_dense else {},
            )
            same = out.resolve() == ckpt_path.resolve()
            save_checkpoint(result_ckpt, out, force=True, inputs=[] if same else [ckpt_path])
            sidecar = trainstate_path(out)
            if final:
                sidecar.unlink(missing_ok=True)
                return
            _save_state(
                sidecar,
                {
                    "format": TRAINSTATE_FORMAT,
                    "step": step,
                    "total_steps": total,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "masks": sparse.masks(),
                    "start_masks": {k: v.cpu() for k, v in start_masks.items()},
                    "history": base_history,
                    "rng": torch.get_rng_state(),
                    "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
                },
            )

        stream = _micro_batches(data, cfg, dist, step0 * cfg.grad_accum)
        params = [p for p in model.parameters() if p.requires_grad]
        losses: list[float] = []
        last_loss: float | None = None
        step = step0
        loop_started = time.perf_counter()
        interrupted = False
        try:
            while step < total:
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = next(stream).to(device)
                    sync = (
                        trained.no_sync()  # type: ignore[operator]
                        if dist.world > 1 and micro < cfg.grad_accum - 1
                        else contextlib.nullcontext()
                    )
                    with sync:
                        with autocast():
                            loss = compute_loss(trained, teacher, batch, data, cfg.temperature)
                        scaled = loss / cfg.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach().float()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                sparse.add_refinement()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                sparse.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean_loss = loss_sum / cfg.grad_accum
                if dist.world > 1:
                    import torch.distributed as tdist

                    tdist.all_reduce(mean_loss)
                    mean_loss /= dist.world
                last_loss = float(mean_loss)
                if not math.isfinite(last_loss):
                    raise DataError(f"the loss became {last_loss} at step {step}: lower --lr or set --max-grad-norm")
                losses.append(last_loss)
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    save(step, False, last_loss)
                if on_step is not None and dist.main:
                    elapsed = time.perf_counter() - loop_started
                    on_step(StepInfo(step, total, last_loss, lr, (step - step0) / max(elapsed, 1e-9), elapsed))
        except KeyboardInterrupt:
            interrupted = True
            optimizer.zero_grad(set_to_none=True)
            save(step, False, last_loss)
        else:
            save(step, True, last_loss)
        if dist.world > 1 and not interrupted:
            import torch.distributed as tdist

            tdist.barrier()
        sparse_final = compare_masks(start_masks, sparse.final_masks())
        return FinetuneResult(
            output=out if dist.main else None,
            steps=step,
            total_steps=total,
            final_loss=last_loss,
            sad_vs_start=sparse_final,
            seconds=time.perf_counter() - started,
            interrupted=interrupted,
            losses=losses,
        )
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            with contextlib.suppress(Exception):
                tdist.destroy_process_group()
