"""Tasks on several workers come back in order, run on one torch thread without autograd, and give the
solvers' results to the bit whatever the number of workers (issue 24)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from nmcli.algorithms.config import CalibrationConfig
from nmcli.algorithms.parallel import Workers
from nmcli.algorithms.solve import SOLVERS
from nmcli.nm.pattern import parse_pattern

P24 = parse_pattern("2:4")


def test_results_come_back_in_task_order_from_several_threads() -> None:
    names: set[str] = set()

    def task(i: int) -> tuple[int, int, bool]:
        time.sleep(0.02 * ((7 - i) % 3))  # later tasks often finish first
        names.add(threading.current_thread().name)
        return i, torch.get_num_threads(), torch.is_grad_enabled()

    with Workers(3) as workers:
        out = list(workers.map(task, range(8)))
    assert [i for i, _, _ in out] == list(range(8))
    assert all(threads == 1 and not grad for _, threads, grad in out)
    assert len(names) > 1


def test_a_failing_task_raises_in_order_and_cancels_the_rest() -> None:
    started: list[int] = []

    def task(i: int) -> int:
        started.append(i)
        if i == 2:
            raise ValueError("task 2")
        time.sleep(0.01)
        return i

    got: list[int] = []
    with Workers(2) as workers, pytest.raises(ValueError, match="task 2"):
        for value in workers.map(task, range(50)):
            got.append(value)
    assert got == [0, 1]
    assert len(started) < 50  # the queue stopped: tasks past the window never started


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("refit", [0, 10])
def test_solvers_give_the_same_bits_on_one_worker_or_three(method: str, refit: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 64, dtype=torch.float64)
    gram = x.t() @ x / 300
    weight = torch.randn(1100, 64, generator=g)  # several row slices: 512 rows (sweep), 128 (refit)
    cfg = CalibrationConfig(spec="", refit_iterations=refit)

    def solved(workers: Workers) -> list[tuple[slice, torch.Tensor, torch.Tensor, float, float]]:
        with workers:
            return list(SOLVERS[method](weight, gram.clone(), P24, cfg, workers))

    one, three = solved(Workers(1)), solved(Workers(3))
    assert len(one) == len(three) > 1
    for (rows_a, mask_a, new_a, num_a, den_a), (rows_b, mask_b, new_b, num_b, den_b) in zip(one, three, strict=True):
        assert rows_a == rows_b
        assert torch.equal(mask_a, mask_b) and torch.equal(new_a, new_b)
        assert (num_a, den_a) == (num_b, den_b)
