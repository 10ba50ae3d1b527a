"""Which fine-tuning settings recover accuracy: BatchNorm mode and re-estimation, optimizer and learning rate.

Everything runs through ``run_finetune`` as ``nmcli finetune`` does, with distillation from the dense
model (``--teacher auto``) and held-out test accuracy in eval mode (``--eval-data``):

- a BatchNorm CNN trained here on scikit-learn's digits, pruned 2:4 by magnitude (no BN
  re-estimation at prune time, the hard case): ``--bn train|freeze``, ``--bn-batches 50|0``;
- the digits MLP (64-128-64-10), pruned 1:4: SGD and AdamW at several learning rates, over seeds.

    python benchmarks/finetune_recovery.py [--steps 40] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.digits import accuracy, digits_split, train_dense  # noqa: E402
from fixtures.models import digits_bn_cnn, tiny_mlp  # noqa: E402
from nmcli.commands.finetune import run_finetune  # noqa: E402
from nmcli.commands.prune import run_prune  # noqa: E402
from nmcli.errors import NmcliError  # noqa: E402
from nmcli.pipelines.training import FinetuneConfig  # noqa: E402


def _setup(work: Path, name: str, factory: str, images: bool, pattern: str) -> tuple[Path, str, str, float]:
    x_train, x_test, y_train, y_test = digits_split(images)
    model = train_dense(digits_bn_cnn() if images else tiny_mlp(), x_train, y_train)
    dense = accuracy(model, x_test, y_test)
    weights = work / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    train, test = work / f"{name}-train.safetensors", work / f"{name}-test.safetensors"
    save_file({"inputs": x_train, "targets": y_train}, str(train))
    save_file({"inputs": x_test, "targets": y_test}, str(test))
    pruned = work / f"{name}-pruned.safetensors"
    arch = f"py:{ROOT / 'fixtures' / 'models.py'}:{factory}"
    run_prune(str(weights), arch=arch, pattern=pattern, keep_dense=True, output=pruned, force=True)
    return pruned, f"tensors:{train}", f"tensors:{test}", dense


def _run(pruned: Path, data: str, test: str, out: Path, **options: object) -> tuple[float, float] | str:
    cfg = FinetuneConfig(data=data, eval_data=test, device="cpu", **options)  # type: ignore[arg-type]
    try:
        result = run_finetune(pruned, cfg, output=out, force=True)
    except NmcliError as exc:
        return str(exc).split(":")[0]
    return result.evals["before"]["accuracy"], result.evals["after"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pruned, data, test, dense = _setup(work, "cnn", "digits_bn_cnn", True, "2:4")
        print(f"\nBatchNorm CNN on digits, 2:4 magnitude, {args.steps} SGD steps, batch 32; dense {100 * dense:.2f}%")
        print("| --bn | --lr | --bn-batches | one-shot % | after % |\n|---|---|---|---|---|")
        for bn, lr, batches in [("train", 0.01, 50), ("train", 0.01, 0), ("train", 0.05, 50), ("freeze", 0.01, 50),
                                ("freeze", 0.001, 50), ("freeze", 0.001, 0)]:  # fmt: skip
            got = _run(pruned, data, test, work / "o.safetensors", steps=args.steps, lr=lr, bn=bn, bn_batches=batches)
            cells = f"{100 * got[0]:.2f} | {100 * got[1]:.2f}" if isinstance(got, tuple) else f"- | failed: {got}"
            print(f"| {bn} | {lr:g} | {batches} | {cells} |", flush=True)

        pruned, data, test, dense = _setup(work, "mlp", "tiny_mlp", False, "1:4")
        steps = 4 * args.steps
        print(f"\ndigits MLP, 1:4 magnitude, {steps} steps, batch 32, cosine; dense {100 * dense:.2f}%")
        print("| optimizer | --lr | after %, seeds | mean % |\n|---|---|---|---|")
        for optimizer, lr in [("sgd", 0.01), ("sgd", 0.05), ("adamw", 1e-4), ("adamw", 1e-3)]:
            scores = []
            for seed in range(args.seeds):
                got = _run(
                    pruned, data, test, work / "o.safetensors", steps=steps, lr=lr, optimizer=optimizer, seed=seed
                )
                if isinstance(got, tuple):
                    scores.append(100 * got[1])
            shown = ", ".join(f"{s:.2f}" for s in scores)
            mean = f"{statistics.mean(scores):.2f}" if scores else "-"
            print(f"| {optimizer} | {lr:g} | {shown} | {mean} |", flush=True)


if __name__ == "__main__":
    main()
