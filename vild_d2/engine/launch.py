"""detectron2's ``launch``, with each worker's process group closed when its work is done and, when
there are several workers, each one ending without the interpreter's teardown."""
import functools
import logging
import os
import sys
import threading

import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT

__all__ = ["launch"]


def _close_after(main_func, *args):
    try:
        return main_func(*args)
    finally:
        # detectron2 leaves the process group to the interpreter's exit, where gloo's worker
        # threads can outlive Python and abort the process ("terminate called without an active
        # exception"), so a finished multi-process run could end with SIGABRT
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _end_worker_after(main_func, *args):
    """One of several spawned workers: its work, then its end with its threads joined and streams
    flushed but without the interpreter's teardown (``atexit`` handlers do not run). Even with the
    process group destroyed, rank 0's C++ static destructors still met a joinable thread at exit
    in about one two-process run in eight, aborting a run whose work was all done and written. A
    worker's return value goes nowhere; an exception propagates to ``torch.multiprocessing``,
    which reports it as before."""
    _close_after(main_func, *args)
    for thread in threading.enumerate():  # what the interpreter would wait for at exit
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """``detectron2.engine.launch`` with the same arguments."""
    several = num_gpus_per_machine * num_machines > 1
    worker = functools.partial(_end_worker_after if several else _close_after, main_func)
    d2_launch(worker, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
