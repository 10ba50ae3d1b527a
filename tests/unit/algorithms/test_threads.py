"""The thread count of calibrated CPU prunes: chosen from the free cores, one thread where bits depend on it."""

from __future__ import annotations

import torch

from nmcli.algorithms.threads import ThreadPace, serial


def test_serial_runs_one_cpu_thread_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    with serial("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with serial("cuda"):  # a device that is not the CPU keeps torch's threads
        assert torch.get_num_threads() == before


def test_pace_stays_between_one_thread_and_its_start_and_gives_the_count_back() -> None:
    before = torch.get_num_threads()
    pace = ThreadPace("cpu")
    try:
        for _ in range(3):
            torch.randn(256, 256) @ torch.randn(256, 256)
            count = pace.adjust()
            assert 1 <= count <= before
            assert torch.get_num_threads() == count
    finally:
        pace.close()
    assert torch.get_num_threads() == before


def test_pace_leaves_other_devices_alone() -> None:
    before = torch.get_num_threads()
    pace = ThreadPace("cuda")
    assert pace.adjust() == before
    pace.close()
    assert torch.get_num_threads() == before
