import subprocess
import sys

import pytest
import torch.distributed as dist

from vild_d2.engine.launch import _close_after


def _init_one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()


def test_the_process_group_is_closed_when_the_work_returns():
    _init_one_process_group()
    assert _close_after(lambda x: x + 1, 1) == 2
    assert not dist.is_initialized()


def test_the_process_group_is_closed_when_the_work_fails():
    _init_one_process_group()

    def fail():
        raise RuntimeError("work failed")

    with pytest.raises(RuntimeError, match="work failed"):
        _close_after(fail)
    assert not dist.is_initialized()


def test_without_a_process_group_nothing_is_closed():
    assert not dist.is_initialized()
    assert _close_after(lambda: "done") == "done"


def test_a_spawned_worker_ends_after_its_work_with_its_output_flushed():
    code = (
        "import sys; from vild_d2.engine.launch import _end_worker_after; "
        "_end_worker_after(lambda: sys.stdout.write('work done')); print('not reached')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "work done")


def test_a_failing_worker_raises_as_before():
    code = (
        "from vild_d2.engine.launch import _end_worker_after\n"
        "def fail():\n    raise RuntimeError('work failed')\n"
        "_end_worker_after(fail)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "RuntimeError: work failed" in done.stderr


@pytest.mark.parametrize(
    "gpus, machines, worker",
    [(1, 1, "_close_after"), (2, 1, "_end_worker_after"), (1, 2, "_end_worker_after")],
)
def test_launch_ends_the_workers_of_multi_process_runs_only(monkeypatch, gpus, machines, worker):
    import vild_d2.engine.launch as launch_module

    calls = []
    monkeypatch.setattr(launch_module, "d2_launch", lambda fn, *a: calls.append(fn))
    launch_module.launch(print, gpus, num_machines=machines)
    assert calls[0].func.__name__ == worker and calls[0].args == (print,)
