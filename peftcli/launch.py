"""The process launcher of ``peft train --num-processes N``: the same command run again as N
processes on this machine (torch's elastic launcher, what ``torchrun --standalone`` runs), after
a check that the devices can hold them; with ``--nnodes M --node-rank R --master-addr A`` as
this machine's N of M·N processes (what ``torchrun --nnodes M --node-rank R --rdzv-backend
static --master-addr A`` runs)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from peftcli.errors import UserError

MASTER_PORT = 29500  # torchrun's default
LAUNCH_FLAGS = ("--num-processes", "--nnodes", "--node-rank", "--master-addr", "--master-port")  # the launcher's, not the workers'


@dataclass(frozen=True)
class Nodes:
    """Where the processes run: ``count`` machines (``--nnodes``), this one ``rank``
    (``--node-rank``, 0-based), node 0 reachable at ``addr:port`` by all (``--master-addr``,
    ``--master-port``), each running ``--num-processes`` of them. Process ``i`` of node ``r`` has
    rank ``r · N + i``, so node 0 holds the first process (the one that writes)."""

    count: int = 1
    rank: int = 0
    addr: str | None = None
    port: int = MASTER_PORT

    def check(self) -> None:
        """Raises:
            UserError: a node rank outside ``0 .. count - 1``; several nodes without ``addr``.
        """
        if not 0 <= self.rank < self.count:
            raise UserError(f"--node-rank {self.rank}: must be below --nnodes {self.count} (nodes are numbered from 0)")
        if self.count == 1 and self.addr:
            raise UserError(f"--master-addr {self.addr}: only with --nnodes above 1 (the processes of one machine "
                            "meet on it without an address)")
        if self.count > 1 and not self.addr:
            raise UserError(f"--nnodes {self.count}: every node needs --master-addr (the address of node 0, "
                            "the same on every node)")
        if not 0 < self.port < 65536:
            raise UserError(f"--master-port {self.port}: not a TCP port (1-65535)")


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


def launch(n: int, nodes: Nodes = Nodes()) -> int:
    """Re-run this ``peft train`` command as ``n`` processes with torch's elastic launcher (what
    ``torchrun --standalone`` runs; gloo on CPU, NCCL on GPUs, chosen by accelerate); on several
    ``nodes``, as this node's ``n`` of them, meeting the others at node 0 (static rendezvous:
    ranks follow the node rank, see :class:`Nodes`).

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
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            args.append(a)
    for logger_name in [k for k in logging.root.manager.loggerDict if k.startswith("torch.distributed")]:
        logging.getLogger(logger_name).setLevel(logging.CRITICAL)  # the workers say what happened
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # no oversubscribed cores
    if nodes.count == 1:
        rendezvous = dict(run_id=str(uuid.uuid4()), rdzv_backend="c10d", rdzv_endpoint="localhost:0")
    else:  # node 0 hosts the store at addr:port; a node's rank is its --node-rank
        rendezvous = dict(run_id="peft", rdzv_backend="static", rdzv_endpoint=f"{nodes.addr}:{nodes.port}",
                          rdzv_configs={"rank": nodes.rank})
    config = LaunchConfig(min_nodes=nodes.count, max_nodes=nodes.count, nproc_per_node=n, max_restarts=0,
                          monitor_interval=0.5, shutdown_timeout=600,  # time for the workers to finish the step and checkpoint
                          **rendezvous)
    if nodes.count > 1:  # the rendezvous waits for every node, silently: say for what
        print(f"node {nodes.rank} of {nodes.count}: waiting for all {nodes.count} nodes at {nodes.addr}:{nodes.port}",
              file=sys.stderr, flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", "peftcli.cli", *args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        for code in (2, 130, 143, 129):
            if code in codes:
                return code
        # a worker killed from outside (the OOM killer, kill -9); the agent then stops the others with SIGTERM
        killed = sorted((f.signal_name() == "SIGTERM", rank, f) for rank, f in e.failures.items() if f.exitcode < 0)
        if killed:
            _, rank, failure = killed[0]
            print(f"error: process {rank} (pid {failure.pid}) was killed by {failure.signal_name()} (out of memory?); the "
                  "other processes stopped with it; resume from the newest checkpoint with the same command and --resume",
                  file=sys.stderr)
            return 1
        return next((c for c in codes if c > 0), 1)
    return 0
