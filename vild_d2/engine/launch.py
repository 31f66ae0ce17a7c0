"""detectron2's ``launch``, with each worker's process group closed when its work is done."""
import functools

import torch.distributed as dist
from detectron2.engine import launch as d2_launch

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


def launch(main_func, num_gpus_per_machine, *args, **kwargs):
    """``detectron2.engine.launch`` with the same arguments."""
    d2_launch(functools.partial(_close_after, main_func), num_gpus_per_machine, *args, **kwargs)
