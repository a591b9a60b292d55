"""On a CPU, a step's micro-batches train side by side: each "lane" is a thread that runs its
micro-batches one after another on its own share of the cores.

Torch spreads every op of one micro-batch over all cores. On a small model the ops are small (a
576-wide layer, a few hundred tokens), and the cores meet at a barrier after each of thousands of
them a step. Two lanes of one core each run the same products with no barrier between them: on a
2-core AMD EPYC (AVX2), two single-threaded 256-row products of the default model's shapes made
120-160 GFLOP/s together, one 512-row product on both cores 80-120. Over whole steps (default
model, fp32, batch 4, seq-len 256, alpaca rows, both ways alternated in one process three times)
the lanes took 168.6 s against 187.3 s.

A run repeats bit for bit all the same: which lane trains which micro-batch depends only on their
sizes (``assign``), each lane adds its gradients into buffers of its own in its own order, and the
lanes' sums are added in lane order. Each micro-batch draws its dropout masks from a seed the main
thread drew for it in order (``lora.functional.seed_stream``).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

import torch

from lora_app.hardware import Precision

CPU_LANES = 2  # measured on 2 cores (see above); more cores give each lane more threads


def lane_count(device_type: str, precision: Precision, gradient_checkpointing: bool, setting: int | None = None,
               processes: int = 1) -> int:
    """How many lanes a run trains in: ``setting`` where the user chose, else 2 for fp32 on a CPU with
    two cores or more, else 1. One lane where it cannot work: on a GPU, which runs one kernel stream;
    under data parallelism, where each process already has its cores; with gradient checkpointing,
    whose recomputation draws its dropout seeds from torch's global generator, not a lane's."""
    if device_type != "cpu" or processes > 1 or gradient_checkpointing:
        return 1
    if setting is not None:
        return max(1, min(setting, cores()))
    # bf16 on a CPU has not been measured in lanes; its products run through oneDNN, not MKL
    return min(CPU_LANES, cores()) if precision.name == "fp32" else 1


def lane_share(batch_size: int, budget: int, lanes: int) -> tuple[int, int]:
    """(examples, padded tokens; 0: no cap) a micro-batch may hold when ``lanes`` train at once: together
    they keep to the step's ``batch_size`` and the token ``budget`` of one micro-batch at a time."""
    return -(-batch_size // lanes), budget // lanes


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def assign(sizes: list[int], lanes: int) -> list[list[int]]:
    """Indices of ``sizes`` for each lane: largest first, each to the lane with the least work so far
    (ties to the lower lane), each lane's list in index order. Depends only on ``sizes``."""
    work, chosen = [0] * lanes, [[] for _ in range(lanes)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lane = min(range(lanes), key=lambda k: work[k])
        work[lane] += sizes[i]
        chosen[lane].append(i)
    return [sorted(indices) for indices in chosen]


class Lanes:
    """``count`` threads with an equal share of the cores each (``threads_each`` torch threads),
    started once for a run."""

    def __init__(self, count: int):
        self.count, self.threads_each = count, max(1, cores() // count)
        self._jobs = [queue.SimpleQueue() for _ in range(count)]
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        ready = threading.Barrier(count + 1)
        main_threads = torch.get_num_threads()
        self._threads = [threading.Thread(target=self._serve, args=(lane, ready), daemon=True,
                                          name=f"lane-{lane}") for lane in range(count)]
        for thread in self._threads:
            thread.start()
        ready.wait()
        # torch.set_num_threads also sets the count that threads started later begin with
        torch.set_num_threads(main_threads)

    def _serve(self, lane: int, ready: threading.Barrier) -> None:
        torch.set_num_threads(self.threads_each)
        torch.get_num_threads()  # a thread takes the process's count on its first parallel op: take it now
        ready.wait()
        while (job := self._jobs[lane].get()) is not None:
            try:
                self._results.put((lane, job(), None))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, which raises it
                self._results.put((lane, None, err))

    def run(self, jobs: list[Callable[[], object]]) -> list[object]:
        """Run ``jobs[lane]`` in each lane at once (None: nothing for that lane); their results, by lane.
        The first error a lane raised is raised here once every lane is done."""
        results, error, pending = [None] * self.count, None, 0
        for lane, job in enumerate(jobs):
            if job is not None:
                self._jobs[lane].put(job)
                pending += 1
        for _ in range(pending):
            lane, result, err = self._results.get()
            results[lane] = result
            error = error or err
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for thread in self._threads:
            thread.join()
