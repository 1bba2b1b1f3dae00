"""Data-loader workers leave the job's stop signals to their rank.

Slurm (scancel, the time limit, ``--signal``) and the deepspeed launcher's ``terminate_process_tree``
signal every process of a job, loader workers included. A worker that died of such a signal would make
its rank raise "DataLoader worker ... killed by signal" wherever the rank was — in the middle of its
preemption checkpoint too. So a worker ignores SIGTERM, SIGINT and SIGUSR1 from anyone but its rank;
the rank decides (it saves, then ends its loaders).

The rank's own SIGTERM still ends a worker at once: that is how the DataLoader stops workers that do
not finish by themselves (torch's worker handler draws the same line, then dies of any other
sender's SIGTERM). Telling the sender apart needs its pid, which only ``sigwaitinfo`` gives Python:
the signals are blocked in the worker and one thread takes them.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from .opener import kill_open_processes

__all__ = ["JOB_SIGNALS", "leave_job_signals_to_the_rank"]

JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def leave_job_signals_to_the_rank(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: runs first in each worker process, on its main thread,
    so the block is inherited by every thread the worker starts later."""
    rank_pid = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    threading.Thread(target=_take_job_signals, args=(rank_pid, worker_id), daemon=True,
                     name="job-signals").start()


def _take_job_signals(rank_pid: int, worker_id: int) -> None:
    told = set()
    while True:
        info = signal.sigwaitinfo(JOB_SIGNALS)
        rank_gone = os.getppid() != rank_pid  # re-parented: nobody is left to stop this worker
        if rank_gone or (info.si_signo == signal.SIGTERM and info.si_pid == rank_pid):
            kill_open_processes()  # os._exit skips atexit: a shard's command must not outlive us
            os._exit(0)
        if info.si_signo not in told:  # once per signal: a job-wide signal reaches every worker
            told.add(info.si_signo)
            print(f"loader worker {worker_id} (pid {os.getpid()}): {signal.Signals(info.si_signo).name} "
                  f"from pid {info.si_pid} left to the rank", file=sys.stderr, flush=True)
