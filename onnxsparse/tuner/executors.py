"""Where the tuner's jobs run: in this process, in a pool of local worker processes (``--jobs N``), or
as tasks on a Ray cluster (``--ray ADDRESS``; ``pip install 'onnxsparse[ray]'``).

Builds are independent and run side by side. Timings run one at a time, each alone on its machine,
so that no two disturb each other: in this process, or as one Ray task after another (on a cluster,
a worker of the machine type to measure). Ray's workers read and write the cache folder by path, so
on a cluster it must be on storage every node mounts at the same path (a local instance shares this
machine's files).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import InputDataError

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
Job = TypeVar("Job")
Result = TypeVar("Result")


class InProcess:
    """Everything here, one job after another."""

    fresh_processes = False  # whether each job runs in a process of its own (its peak memory is the job's)

    def describe(self) -> str:
        return "built and timed in this process"

    def run(self, function: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[tuple[int, Result | BaseException]]:
        """(index, result) of each job as it finishes; in a worker, a job whose process dies yields the
        error instead (in this process, an error is ours and propagates)."""
        for index, job in enumerate(jobs):
            yield index, function(job)

    def call(self, function: Callable[..., Result], *args: Any) -> Result:
        return function(*args)

    def close(self) -> None:
        pass


class ProcessPool(InProcess):
    """Builds in ``workers`` spawned processes (a fork of a process running onnxruntime's thread
    pools can deadlock), a new one for each build so that its peak memory is the build's; timings stay
    in this process, one at a time."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.fresh_processes = sys.version_info >= (3, 11)  # max_tasks_per_child came in Python 3.11

    def describe(self) -> str:
        return f"built in {self.workers} worker processes, timed in this process one at a time"

    def run(self, function: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[tuple[int, Result | BaseException]]:
        context = multiprocessing.get_context("spawn")
        options: dict[str, Any] = {"max_tasks_per_child": 1} if self.fresh_processes else {}
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)) or 1, mp_context=context, **options) as pool:
            futures = {pool.submit(function, job): index for index, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()  # BrokenProcessPool when its worker was killed (out of memory)
                yield futures[future], future.result() if error is None else error


class RayCluster(InProcess):
    """Builds as Ray tasks, side by side; timings as Ray tasks one after another. ``address``: a
    cluster's (``auto``, ``ray://host:10001``) or ``local`` for an instance of this machine, started
    here and stopped by :meth:`close`. Each build runs in a worker process of its own (``max_calls=1``)."""

    fresh_processes = True

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError as error:
            raise InputDataError("--ray: Ray is not installed; pip install 'onnxsparse[ray]'") from error
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address == "local":  # the objects passed are paths and one sample's feed: no need for 30% of memory
                options["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
            try:
                ray.init(address=None if address == "local" else address, **options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise InputDataError(f"--ray {address}: cannot join the cluster ({error})") from error
        self._cpus = ray.cluster_resources().get("CPU")
        log.info("tune: Ray with %s CPUs", self._cpus)

    def describe(self) -> str:
        return f"built and timed as Ray tasks ({self._cpus:g} CPUs; timings one at a time)"

    def run(self, function: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[tuple[int, Result | BaseException]]:
        remote = self._ray.remote(max_calls=1)(function)
        pending = {remote.remote(job): index for index, job in enumerate(jobs)}
        while pending:
            done, _ = self._ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            result: Result | BaseException
            try:
                result = self._ray.get(done[0])
            except Exception as error:  # noqa: BLE001 - Ray's task and worker errors: this job's, not the search's
                result = error
            yield index, result

    def call(self, function: Callable[..., Result], *args: Any) -> Result:
        return self._ray.get(self._ray.remote(function).remote(*args))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def executor(jobs: int, ray_address: str | None) -> InProcess:
    if ray_address:
        return RayCluster(ray_address)
    return ProcessPool(jobs) if jobs > 1 else InProcess()
