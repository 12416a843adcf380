"""The process launcher of ``peft train --num-processes N``: the same command run again as N
data-parallel processes on this machine (torch's elastic launcher, what ``torchrun
--standalone`` runs), after a check that the devices can hold them."""

from __future__ import annotations

import os
import sys

from peftcli.errors import UserError


def check_devices(n: int) -> None:
    """With CUDA visible, each process takes its own GPU (NCCL refuses two on one device).

    Raises:
        UserError: more processes than visible GPUs.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < n:
        raise UserError(f"--num-processes {n}: only {gpus} GPU(s) visible, one process per GPU "
                        "(for processes on the CPU instead: CUDA_VISIBLE_DEVICES= peft train ...)")


def launch(n: int) -> int:
    """Re-run this ``peft train`` command as ``n`` processes with torch's elastic launcher (what
    ``torchrun --standalone`` runs; gloo on CPU, NCCL on GPUs, chosen by accelerate).

    The launcher holds SIGINT/SIGTERM/SIGHUP here and passes the signal on to the workers, which
    checkpoint and stop; the first worker prints the one message. Returns the exit status:
    2 if a worker stopped on a user error, 128 + signal if stopped by one, else the workers'.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            args.append(a)
    for logger_name in [k for k in logging.root.manager.loggerDict if k.startswith("torch.distributed")]:
        logging.getLogger(logger_name).setLevel(logging.CRITICAL)  # the workers say what happened
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # no oversubscribed cores
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          shutdown_timeout=600)  # time for the workers to finish the step and checkpoint
    try:
        elastic_launch(config, sys.executable)("-m", "peftcli.cli", *args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        for code in (2, 130, 143, 129):
            if code in codes:
                return code
        return next((c for c in codes if c > 0), 1)
    return 0
