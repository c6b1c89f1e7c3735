"""Where a worker runs: MPI rank, node-local rank, device and CPU threads.

A worker started by ``mpirun``/``mpiexec``/``srun`` (recognised from the
launcher's environment variables) asks MPI, through mpi4py, for its rank in
``COMM_WORLD`` and its rank among the processes of its node
(``Split_type(COMM_TYPE_SHARED)``). A worker started on its own is rank 0 of 1
and never imports mpi4py. The node-local rank spreads the workers of a node over
its GPUs and shares its CPU cores between them.

torch and mpi4py are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from .errors import InputError

#: Environment variables set by common MPI launchers (MPICH/Hydra, Intel MPI,
#: Open MPI, PMIx, MVAPICH, Slurm's PMI plugins) in every process they start.
MPI_ENV_VARS = (
    "PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "PMIX_NAMESPACE",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "HYDRA_CONTROL_FD",
    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
)


class DeviceError(InputError):
    """A ``--device`` that this machine cannot provide."""


@dataclass(frozen=True)
class Placement:
    """Rank of this process in the job and on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    host: str = ""
    mpi: bool = False

    def label(self) -> str:
        """``rank 1/4 on node03 (local 1/2)``."""
        return f"rank {self.rank}/{self.size} on {self.host} (local {self.local_rank}/{self.local_size})"


def launched_by_mpi(environ=None) -> bool:
    """True when an MPI launcher started this process (any of :data:`MPI_ENV_VARS` is set)."""
    env = os.environ if environ is None else environ
    return any(name in env for name in MPI_ENV_VARS)


def _placement_from_env(env, host: str) -> Placement:
    """Best guess from launcher variables, used only when mpi4py is unusable."""

    def first(*names, default=0):
        for name in names:
            if env.get(name, "").strip().isdigit():
                return int(env[name])
        return default

    rank = first("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
    size = first("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = first("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                       "SLURM_LOCALID", default=rank)
    local_size = first("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                       default=size)
    return Placement(rank, max(size, 1), local_rank, max(local_size, 1), host, mpi=False)


def detect_placement(environ=None) -> Placement:
    """This process's :class:`Placement`; initialises MPI only under an MPI launcher.

    If mpi4py cannot be imported or initialised, the launcher's variables are
    used instead and a warning goes to stderr.
    """
    env = os.environ if environ is None else environ
    host = socket.gethostname()
    if not launched_by_mpi(env):
        return Placement(host=host)
    try:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        placement = Placement(world.Get_rank(), world.Get_size(), local.Get_rank(), local.Get_size(),
                              MPI.Get_processor_name() or host, mpi=True)
        local.Free()
        return placement
    except Exception as err:  # a broken MPI installation must not stop a worker that needs no MPI calls
        placement = _placement_from_env(env, host)
        print(f"qmmm-driver: warning: started by an MPI launcher but mpi4py failed ({err}); "
              f"using the launcher's variables: {placement.label()}", file=sys.stderr)
        return placement


def select_device(spec: str, local_rank: int = 0):
    """The torch device for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` and ``cuda`` give ``cuda:{local_rank % n_gpus}`` (``auto`` falls back
    to the CPU without CUDA); ``cuda:N`` is taken as given.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if has_cuda else 0
    if spec == "auto":
        return torch.device(f"cuda:{local_rank % n_gpus}") if n_gpus else torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not n_gpus:
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        if spec == "cuda":
            return torch.device(f"cuda:{local_rank % n_gpus}")
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise DeviceError(f"--device {spec}: expected cuda:N with an integer N") from None
        if not 0 <= index < n_gpus:
            raise DeviceError(f"--device {spec}: this machine has {n_gpus} GPU(s) (cuda:0-cuda:{n_gpus - 1})")
        return torch.device(f"cuda:{index}")
    raise DeviceError(f"--device {spec}: use auto, cpu, cuda or cuda:N")


def threads_per_worker(requested: int = 0, environ=None) -> int:
    """CPU threads of one worker: ``--threads`` if given, else ``OMP_NUM_THREADS``, else 1.

    One thread is the default because a worker shares its node's cores with
    i-PI, the other workers and the MM engine: with the small QM regions of
    QM/MM, extra threads mostly spin-wait, and on a shared 2-core machine two
    threads per worker made each evaluation about 5 times slower than one
    (benchmarks/ipi_pimd.py). Give more threads for large MM environments on
    dedicated cores.
    """
    if requested > 0:
        return int(requested)
    env = os.environ if environ is None else environ
    explicit = env.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return 1


def setup_torch(placement: Placement, device_spec: str = "auto", threads: int = 0):
    """Pick the device and set torch's thread count; returns ``(device, n_threads)``."""
    import torch

    device = select_device(device_spec, placement.local_rank)
    n_threads = threads_per_worker(threads)
    torch.set_num_threads(n_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, n_threads
