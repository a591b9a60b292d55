"""Lanes: a CPU step's micro-batches trained side by side in threads (lora_app/training/lanes.py)."""

import threading

import pytest
import torch

from lora_app.hardware import Precision
from lora_app.training import lanes
from lora_app.training.lanes import Lanes, assign, lane_count

FP32, BF16 = Precision("fp32", ""), Precision("bf16", "")


def test_micro_batches_go_to_the_lane_with_the_least_work_largest_first():
    assert assign([5, 3, 3, 1], 2) == [[0, 3], [1, 2]]
    assert assign([1, 1, 1], 2) == [[0, 2], [1]]
    assert assign([7], 2) == [[0], []]
    assert assign([4, 4], 1) == [[0, 1]]


@pytest.mark.parametrize("cores, device, precision, checkpointing, setting, processes, expected", [
    (2, "cpu", FP32, False, None, 1, 2),   # the measured case
    (16, "cpu", FP32, False, None, 1, 2),  # more cores: more threads in each lane
    (1, "cpu", FP32, False, None, 1, 1),
    (2, "cpu", BF16, False, None, 1, 1),   # not measured in lanes
    (2, "cuda", BF16, False, None, 1, 1),
    (2, "cpu", FP32, True, None, 1, 1),    # checkpointing redraws its seeds from the global generator
    (2, "cpu", FP32, False, None, 2, 1),   # data parallelism: each process has its cores
    (2, "cpu", FP32, False, 1, 1, 1),      # the user's choice
    (8, "cpu", BF16, False, 4, 1, 4),
    (2, "cpu", FP32, False, 4, 1, 2),      # never more lanes than cores
])
def test_how_many_lanes(monkeypatch, cores, device, precision, checkpointing, setting, processes, expected):
    monkeypatch.setattr(lanes, "cores", lambda: cores)
    assert lane_count(device, precision, checkpointing, setting, processes) == expected


def test_each_lane_runs_on_its_own_threads_and_the_process_keeps_its_own(monkeypatch):
    monkeypatch.setattr(lanes, "cores", lambda: 2)
    before = torch.get_num_threads()
    pool = Lanes(2)
    try:
        seen = pool.run([lambda: (threading.current_thread().name, torch.get_num_threads())] * 2)
        assert seen == [("lane-0", 1), ("lane-1", 1)]
        assert pool.run([None, lambda: "only the second"]) == [None, "only the second"]
        assert torch.get_num_threads() == before
        later = []  # a thread started afterwards begins with the process's count, not a lane's
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [before]

        def fails():
            raise ValueError("lane trouble")
        with pytest.raises(ValueError, match="lane trouble"):
            pool.run([fails, lambda: 1])
        assert pool.run([lambda: 2, lambda: 3]) == [2, 3]  # the lanes still serve after an error
    finally:
        pool.close()
    assert not any(t.name.startswith("lane-") and t.is_alive() for t in threading.enumerate())
