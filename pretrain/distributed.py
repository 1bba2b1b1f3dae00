"""Everything distributed, in one place: the process group, this rank's device and precision, the
preemption flag, the ranks' heartbeat, and every collective the trainer runs.

Two kinds of collectives live here:

- **Control plane** (agree on a flag, sum counters, average a metric): tiny tensors made here on
  the group's *communication device*. Under NCCL that is the GPU: NCCL serves only CUDA tensors,
  and ``all_reduce`` of a CPU tensor raises "No backend type associated with device type cpu"
  (gloo, the CPU backend, serves CPU tensors, so a CPU-only test suite never sees it).
- **Data plane** (gather embeddings with autograd, gather an EMA shard): the caller's tensors,
  already on the compute device.

No other module of the package calls ``torch.distributed`` collectives (a test checks it), so the
device rule above is written once.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["HEARTBEAT_EXIT_CODE", "PREEMPTION", "Preemption", "all_ranks", "any_rank", "barrier", "broadcast_object",
           "communication_device",
           "compute_device", "gather_objects", "gather_rows", "gather_rows_with_grad", "init_distributed",
           "init_single_process", "is_main", "explain_failure", "leave_distributed", "mean_over_ranks",
           "precision_dtype", "rank", "set_tf32", "sum_over_ranks", "sum_tensor_over_ranks", "synchronize",
           "world_size"]

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a ``deepspeed.precision`` name (bf16, fp16, fp32)."""
    return PRECISION_DTYPES[precision]


# -- joining and leaving ---------------------------------------------------------------------
def _accelerator():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def _on_gpu() -> bool:
    return _accelerator().device_name() == "cuda"


def init_distributed(precision: str, timeout_s: float | None = None, heartbeat_timeout_s: float = 0.0,
                     tf32: bool = True) -> bool:
    """Joins the launcher's process group: NCCL on GPUs (after binding this process to the GPU
    ``LOCAL_RANK``, so NCCL's communicator and every tensor use it), gloo on CPU. False when
    ``precision`` cannot run on this device (the reason printed). ``timeout_s`` bounds every
    collective wait (torch's default when None); ``heartbeat_timeout_s`` > 0 starts the heartbeat
    (a rank silent that long stops every rank); ``tf32``: see ``set_tf32``."""
    import deepspeed
    on_gpu = _on_gpu()
    if not on_gpu and precision == "fp16":
        print("config error: deepspeed.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); "
              "use deepspeed.precision=bf16 or fp32 here.", file=sys.stderr)
        return False
    if on_gpu:
        _accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A run's convolution shapes are fixed: cuDNN picks the fastest algorithm once per shape.
        torch.backends.cudnn.benchmark = True
    set_tf32(tf32)
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kwargs)
    if heartbeat_timeout_s > 0 and world_size() > 1:
        _HEARTBEAT.start(heartbeat_timeout_s)
    return True


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls (cuBLAS) and convolutions (cuDNN) on CUDA tensor cores in TF32, or in full fp32.
    bf16/fp16 compute and CPU tensors are unaffected. Through the flags ``allow_tf32``, which torch
    also reports through ``fp32_precision`` (what inductor reads); setting ``fp32_precision`` here
    instead would make a later read of ``allow_tf32`` (DeepSpeed, user code) raise."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def init_single_process() -> None:
    """A one-rank process group for tools run without the launcher (benchmarks), on a free port
    unless MASTER_PORT says otherwise (two benchmarks on one node must not collide)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    init_distributed("bf16")


def leave_distributed() -> None:
    """All ranks leave together: a process that exits with its gloo group alive, its peers still
    talking, can abort in the group's teardown ("terminate called without an active exception")."""
    _HEARTBEAT.stop()
    barrier()
    dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


# -- devices ---------------------------------------------------------------------------------
def compute_device() -> torch.device:
    """This rank's compute device: ``cuda:LOCAL_RANK`` on GPUs (set by ``init_distributed``),
    else the CPU."""
    return torch.device(_accelerator().current_device_name())


def synchronize() -> None:
    """Waits for the compute device's queued work (before reading a clock; no-op on the CPU)."""
    if compute_device().type == "cuda":
        torch.cuda.synchronize()


def communication_device() -> torch.device:
    """Where control-plane tensors must live for the default group's backend: the CPU when the
    group serves CPU tensors (gloo), else the device it serves (the GPU under NCCL)."""
    served = {device.type for device in dist.group.WORLD._device_types}
    if not served or "cpu" in served:
        return torch.device("cpu")
    compute = compute_device()
    return compute if compute.type in served else torch.device(sorted(served)[0])


# -- control plane ---------------------------------------------------------------------------
def barrier() -> None:
    """Waits for every rank (bounded by the process group's timeout)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (any picklable object; the others pass anything)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=communication_device())
    return box[0]


def gather_objects(value: Any) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _reduced(values: Sequence[float], op) -> list[float]:
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                          device=communication_device())
    if world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return _reduced([1.0 if flag else 0.0], dist.ReduceOp.MAX)[0] > 0


def all_ranks(flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on all of them. A tensor flag (e.g. from
    ``isfinite(...).all()`` on the GPU) is reduced where it lies when the group serves that device,
    so asking costs one device→host copy, after the collective."""
    if isinstance(flag, torch.Tensor):
        flag = flag.detach().reshape(()).to(device=communication_device(), dtype=torch.float64)
        tensor = flag.reshape(1).clone()
        if world_size() > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item() > 0)
    return _reduced([1.0 if flag else 0.0], dist.ReduceOp.MIN)[0] > 0


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks of ``values`` (counters; float64, exact below 2**53)."""
    return _reduced(values, dist.ReduceOp.SUM)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over all ranks (every rank must pass the same keys)."""
    keys = sorted(values)
    sums = sum_over_ranks([values[k] for k in keys])
    return {k: s / world_size() for k, s in zip(keys, sums)}


# -- data plane ------------------------------------------------------------------------------
def sum_tensor_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``tensor`` summed over all ranks (on its own device, no grad)."""
    total = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank → (world·B, ...) in rank order, without grad; every rank passes the same
    shape."""
    if world_size() == 1:
        return tensor
    if tensor.is_cuda:  # NCCL gathers straight into one buffer
        out = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherRowsWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns each rank the summed gradient of its slice:
    a reduce-scatter under NCCL (each rank receives only its rows), an all-reduce under gloo, which
    has no reduce-scatter."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = rank(), tensor.shape[0]
        return gather_rows(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.is_cuda:
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad.contiguous())
            return mine
        total = sum_tensor_over_ranks(grad.contiguous())
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank → (world·B, ...) in rank order, differentiable; identity on one process."""
    return tensor if world_size() == 1 else _GatherRowsWithGrad.apply(tensor)


# -- preemption ------------------------------------------------------------------------------
class Preemption:
    """Records SIGTERM/SIGUSR1; ranks agree on it at each step boundary.

    One per process (``PREEMPTION``), so a signal that arrives between two runs in one process (the
    stages of a fine-tuning job) is still seen by the next.
    """

    def __init__(self):
        self.flag = False
        self.installed = False

    def install(self) -> "Preemption":
        if not self.installed:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (collective: all ranks call it)."""
        return any_rank(self.flag)


PREEMPTION = Preemption()


# -- liveness --------------------------------------------------------------------------------
HEARTBEAT_EXIT_CODE = 5


class _Heartbeat:
    """Stops every rank when one rank goes silent, naming it.

    A rank that dies on another node (a killed process, a failed node) leaves its peers blocked in
    their next collective until the collective timeout, an hour by default, with nothing to say which
    rank is gone; its own node's launcher only ends that node. So every rank's thread counts beats
    into the process group's store (``internimage/beat/<rank>``: count and host); rank 0's thread
    notes, on its own clock, when each count last moved, and posts a verdict
    (``internimage/stopped``) when one stood still for the timeout. Every rank reads the verdict,
    prints it and exits with ``HEARTBEAT_EXIT_CODE``; the run resumes from its last complete
    checkpoint. The store lives in rank 0's process: a rank that loses it blames rank 0.

    Cost: one store write per rank per beat (timeout / 8, at most 10 s), and rank 0 one read of
    all ranks' keys; the threads hold no GIL while they wait.
    """

    VERDICT = "internimage/stopped"

    def __init__(self):
        self.stopping = threading.Event()
        self.thread = None

    def start(self, timeout_s: float) -> None:
        if self.thread is not None:
            return
        self.timeout_s, self.interval_s = timeout_s, min(10.0, timeout_s / 8)
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = rank(), world_size()
        self.host = socket.gethostname()
        self.beats = 0
        self._beat()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Leaving on purpose: this rank's beat says so, and its silence is not a death."""
        if self.thread is None:
            return
        self.stopping.set()
        self.thread.join()
        self.thread = None
        try:
            self.store.set(self._key(self.rank), "left")
        except RuntimeError:
            pass

    def _key(self, r: int) -> str:
        return f"internimage/beat/{r}"

    def _beat(self) -> None:
        self.beats += 1
        self.store.set(self._key(self.rank), f"{self.beats} {self.host}")

    def _run(self) -> None:
        moved = {}  # rank → (last count seen, rank 0's clock when it changed)
        while not self.stopping.wait(self.interval_s):
            try:
                self._beat()
                if self.rank == 0:
                    self._judge(moved)
                if self.store.check([self.VERDICT]):
                    self._exit(self.store.get(self.VERDICT).decode())
            except (RuntimeError, OSError) as exc:  # the store is gone with rank 0's process
                if not self.stopping.is_set():
                    self._exit(f"lost the rendezvous store in rank 0's process ({exc}): rank 0 stopped "
                               "answering (it died or its node failed)")

    def _judge(self, moved: dict) -> None:
        keys = [self._key(r) for r in range(self.world)]
        if not self.store.check(keys):  # a rank that has not joined yet is the rendezvous' business
            return
        now = time.monotonic()
        for r, value in enumerate(self.store.multi_get(keys)):
            beat = value.decode()
            if beat == "left":
                moved.pop(r, None)
                continue
            if moved.get(r, (None,))[0] != beat:
                moved[r] = (beat, now)
            elif now - moved[r][1] > self.timeout_s:
                host = beat.split(" ", 1)[1]
                self.store.set(self.VERDICT, f"rank {r} (host {host}) stopped answering: no heartbeat for "
                                             f"{now - moved[r][1]:.0f} s (deepspeed.heartbeat_timeout_seconds="
                                             f"{self.timeout_s:g}); it died or its node failed")
                time.sleep(2 * self.interval_s)  # the store lives here: let every rank read the verdict
                return

    def explain(self, error: BaseException) -> None:
        """After ``error`` in this rank's work: when it looks like a lost peer (gloo reports a killed
        peer at once, as "Connection closed by peer") and the heartbeat runs, waits for the verdict
        that names the rank, then exits with it. Returns otherwise (the caller re-raises)."""
        if self.thread is None or not _looks_like_a_lost_peer(error):
            return
        print(f"rank {self.rank}: a collective failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
              f"waiting up to {self.timeout_s + 3 * self.interval_s:.0f} s for the heartbeat to name the rank "
              "that stopped", file=sys.stderr, flush=True)
        self.stopping.wait(self.timeout_s + 3 * self.interval_s)  # the thread exits the process with the verdict

    def _exit(self, verdict: str) -> None:
        print(f"rank {self.rank}: stopping: {verdict}. The same command resumes from the last complete "
              "checkpoint.", file=sys.stderr, flush=True)
        os._exit(HEARTBEAT_EXIT_CODE)  # the main thread may be blocked in a collective that never returns


def _looks_like_a_lost_peer(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo"))


_HEARTBEAT = _Heartbeat()


def explain_failure(error: BaseException) -> None:
    """See ``_Heartbeat.explain``: exits naming a rank that stopped, or returns."""
    _HEARTBEAT.explain(error)
