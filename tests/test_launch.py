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
