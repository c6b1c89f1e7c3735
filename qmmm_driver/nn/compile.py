"""Ahead-of-time compilation of a :class:`~qmmm_driver.nn.potential.Potential` (AOTInductor).

One force call of the eager model runs a few thousand small tensor operations,
whose per-operation overhead, not arithmetic, sets the cost for QM regions of a
few atoms. Compiling traces the energy and its gradients once into one graph of
ATen operations (``make_fx``: the backward pass is traced like the forward
pass), exports it with dynamic batch size, MM atom count and near-atom count
(the QM atom count is fixed), and compiles it to a shared library packaged as a
``.pt2`` file that loads in milliseconds (``torch._inductor.aoti_load_package``).

The package carries, as metadata, the checksum of the model it was made from,
the QM atom count, dtype, device type and torch version: :func:`load_compiled`
refuses a package that does not match (the caller then runs the eager model).
On x86-64 CPUs (torch >= 2.13) the code is generated for ``x86-64-v3`` (AVX2 and FMA), so that a
package runs on any such machine, not only the one that compiled it.
"""

from __future__ import annotations

import logging
import multiprocessing
import operator
import platform
import signal
import tempfile
from pathlib import Path

import torch

from .model import QMMMModel
from .potential import Potential


class CompiledModelError(ValueError):
    """A compiled package that does not belong to this model, device, dtype or torch."""


#: what a refused package's message tells the user to do
_RETRY = "compile again (without --tune if it was given), or report the torch version"


def compiled_path(model_path: str | Path, n_qm: int, device: str | torch.device, dtype: torch.dtype) -> Path:
    """Where the compiled form of a model file lives: beside it, named by device, dtype and QM atom count."""
    model_path = Path(model_path)
    kind = torch.device(device).type
    return model_path.with_name(f"{model_path.stem}.{kind}-{str(dtype).removeprefix('torch.')}-nqm{n_qm}.pt2")


def _example_inputs(model: QMMMModel, n_qm: int, device, dtype):
    """Inputs whose sizes are all different (symbolic tracing gives equal sizes one symbol)."""
    g = torch.Generator().manual_seed(0)
    B, M, m = 7 if n_qm not in (6, 7, 8) else 11, 61, 13
    qm = (torch.randn(B, n_qm, 3, generator=g) * 1.5).to(device, dtype)
    mm = (torch.randn(B, M, 3, generator=g) * 10.0 + 4.0).to(device, dtype)
    charge = torch.randn(B, M, generator=g).to(device, dtype) * 0.5
    near = torch.randint(0, M, (B, m), generator=g).to(device)
    near_mask = torch.ones(B, m, device=device, dtype=dtype)
    species = torch.randint(0, len(model.elements), (B, n_qm), generator=g).to(device)
    total = torch.zeros(B, device=device, dtype=dtype)
    return species, qm, mm, charge, near, near_mask, total


def _split_products(gm: torch.fx.GraphModule) -> None:
    """Rewrite ``operator.mul(a, b, c)`` of symbolic sizes into ``mul(mul(a, b), c)``.

    (The exported graph can hold three-argument products of sizes, which the
    compiler's interpreter does not accept.)
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.mul and len(node.args) > 2:
            with graph.inserting_before(node):
                acc = node.args[0]
                for arg in node.args[1:-1]:
                    acc = graph.call_function(operator.mul, (acc, arg))
            node.args = (acc, node.args[-1])
    gm.recompile()


class _Traced(torch.nn.Module):
    """The traced graph with the model's parameters and buffers held as constants."""

    def __init__(self, graph: torch.fx.GraphModule, state: list[torch.Tensor]):
        super().__init__()
        self.graph_module = graph
        self.n_state = len(state)
        for k, t in enumerate(state):
            self.register_buffer(f"state_{k}", t)

    def forward(self, species, qm, mm, charge, near, near_mask, total):
        state = [getattr(self, f"state_{k}") for k in range(self.n_state)]
        return self.graph_module(state, species, qm, mm, charge, near, near_mask, total)


def export_potential(model: QMMMModel, n_qm: int, device="cpu", dtype=torch.float32):
    """``torch.export`` program of the model's :class:`Potential` for frames of ``n_qm`` QM atoms."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    potential = Potential(model.to(device, dtype).eval())
    names = [k for k, _ in potential.named_parameters()] + [k for k, _ in potential.named_buffers()]
    state = [t.detach() for _, t in potential.named_parameters()] + [t for _, t in potential.named_buffers()]

    def functional(state, *inputs):
        return functional_call(potential, dict(zip(names, state)), inputs)

    example = _example_inputs(model, n_qm, device, dtype)
    graph = make_fx(functional, tracing_mode="symbolic")(state, *example)
    traced = _Traced(graph, state)
    batch = torch.export.Dim("batch", min=1)
    n_mm = torch.export.Dim("n_mm", min=1)
    n_near = torch.export.Dim("n_near", min=1)
    dynamic = ({0: batch}, {0: batch}, {0: batch, 1: n_mm}, {0: batch, 1: n_mm}, {0: batch, 1: n_near},
               {0: batch, 1: n_near}, {0: batch})
    # A shape condition that torch cannot prove for every size (torch 2.11 fails to prove min(M, 16 M) == M for the
    # MM atom count) becomes a check in the program instead of a refusal to export.
    program = torch.export.export(traced, example, dynamic_shapes=dynamic,
                                  prefer_deferred_runtime_asserts_over_guards=True)
    _split_products(program.graph_module)
    return program


def compile_model(model: QMMMModel, checksum: str, n_qm: int, path: str | Path, device="cpu",
                  dtype=torch.float32, tune: bool = False) -> Path:
    """Compile the model for frames of ``n_qm`` QM atoms into the package ``path`` (minutes on a CPU).

    ``tune``: time every matrix product of the graph against generated code (on a CPU, inductor's C++
    micro-kernels, which skip the library call and its packing for the small matrices of a QM region) and keep
    the faster; the compile takes a few times longer. Epilogue fusion is off then (torch 2.13's batched-product
    template fails on some fused epilogues).
    """
    import torch._inductor

    program = export_potential(model, n_qm, device, dtype)
    metadata = {"model_checksum": checksum, "n_qm": str(n_qm), "dtype": str(dtype),
                "device": torch.device(device).type, "torch_version": torch.__version__}
    # freezing: the weights are folded into the program as constants (8-10% off a water call on one CPU thread,
    # bit-identical results; benchmarks/compare_packages.py)
    configs = {"aot_inductor.metadata": metadata, "freezing": True}
    if tune:
        configs.update({"max_autotune": True, "epilogue_fusion": False})
        if torch.device(device).type == "cpu":
            configs["max_autotune_gemm_backends"] = "CPP,ATEN"
    if (torch.device(device).type == "cpu" and platform.machine() in ("x86_64", "AMD64")
            and hasattr(torch._inductor.config.cpp, "march")):  # (torch < 2.13 compiles for this machine's CPU)
        configs["cpp.march"] = "x86-64-v3"
        # and the vectorised kernels for AVX2 (256-bit): inductor picks its vector ISA from this machine's CPU
        # (AVX-512 code, AMX recorded, on the CPUs the shipped packages were built on), march alone does not
        configs["cpp.simdlen"] = 256
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        with tempfile.TemporaryDirectory() as scratch:  # the model as a file, for the checking process
            from .io import save_model

            model_file = save_model(model, Path(scratch) / "model.pt")
            run_isolated(_verify_file, (model_file, tmp, checksum, n_qm, torch.device(device), dtype),
                         f"checking compiled package {path} against the eager model")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def _verify_file(model_file: Path, package: Path, checksum: str, n_qm: int, device, dtype) -> None:
    from .io import load_model

    verify_package(load_model(model_file, device), package, checksum, n_qm, device, dtype)


def _child(conn, target, args) -> None:
    try:
        target(*args)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it as a refusal
        conn.send(str(err) if isinstance(err, CompiledModelError) else f"{type(err).__name__}: {err}")
    conn.close()


def run_isolated(target, args: tuple, what: str) -> None:
    """``target(*args)`` in a fresh (spawned) process; its error, or its death, raised here as a
    :class:`CompiledModelError`. A faulty compiled kernel can abort the process that runs it (torch 2.13's tuned
    water compile once threw from inside a parallel loop: ``terminate called``), which must not take the
    compiling command, and its clean-up, with it."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, target, args), daemon=True)
    child.start()
    send.close()
    try:
        message = receive.recv()  # a refusal, or the end of the pipe when the child exits (or dies)
    except EOFError:
        message = None
    except BaseException:  # Ctrl-C here: the check stops with us, no orphan
        child.terminate()
        child.join()
        raise
    child.join()
    if message is not None:
        raise CompiledModelError(message)
    if child.exitcode != 0:
        code = child.exitcode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise CompiledModelError(f"{what}: the process died ({how}); the package was not written: {_RETRY}")


def verify_package(model: QMMMModel, path: str | Path, checksum: str, n_qm: int, device="cpu",
                   dtype=torch.float32) -> None:
    """Run the package and the eager :class:`Potential` on the same frames (batches of 1, 3 and 11, MM counts
    61 and 7) and raise :class:`CompiledModelError` where any output differs beyond float rounding, or where the
    package fails: a compiler can miscompile (torch 2.13's tuned matrix-product kernels did, for 6 QM atoms)."""
    runner = load_compiled(path, checksum, n_qm, device, dtype)
    eager = Potential(model.to(device, dtype).eval())
    inputs = _example_inputs(model, n_qm, device, dtype)
    names = ["energy", "dE/dqm", "dE/dmm", "dE/dcharge", "charges", "dipole"]
    for B, M in ((1, 61), (3, 7), (inputs[0].shape[0], 61)):
        frames = [t[:B] for t in inputs]
        frames[2], frames[3] = frames[2][:, :M].contiguous(), frames[3][:, :M].contiguous()
        frames[4] = frames[4] % M
        try:
            got = runner(*frames)
        except Exception as err:  # noqa: BLE001 - any failure of the package is a refusal
            raise CompiledModelError(f"compiled package {path} fails on {B} frame(s): {err}") from err
        ref = eager(*frames)
        for name, a, b in zip(names, got, ref):
            size = float(b.abs().max())
            difference = float((a.double() - b.double()).abs().max())
            if not torch.isfinite(a).all() or difference > 1e-3 * (size + 1.0):
                raise CompiledModelError(
                    f"compiled package {path} disagrees with the eager model ({name}, {B} frame(s), {M} MM "
                    f"charges: max difference {difference:.3g} for values up to {size:.3g}); it was not written: "
                    f"{_RETRY}")


class CompiledPotential:
    """A loaded package, called like :class:`Potential` with a tuple of tensors.

    It calls the package's runner directly: torch's own wrapper re-parses the
    input and output tree specs (JSON) at every call, a few hundred microseconds
    of Python per force call for a flat tuple that never changes.
    """

    def __init__(self, package):
        self.package = package  # owns the loaded library the runner lives in
        self._run = package.loader.boxed_run

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._run(list(inputs)))


def _wider_isa(record: logging.LogRecord) -> bool:
    """False for torch's warning that a package made for AVX2 is loaded on a CPU with more (AVX-512): packages
    are built for AVX2 on purpose and run there unchanged; every other record passes."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (len(args) == 3 and args[0] == "AOTI_CPU_ISA" and args[2] == "AVX2" and "AVX512" in str(args[1]))


def load_compiled(path: str | Path, checksum: str, n_qm: int, device, dtype) -> CompiledPotential:
    """The compiled potential in ``path`` (a callable like :class:`Potential`), checked against the model."""
    import torch._inductor

    logger = logging.getLogger("torch.export.pt2_archive._package")
    logger.addFilter(_wider_isa)
    try:
        runner = torch._inductor.aoti_load_package(str(path), device_index=torch.device(device).index or -1
                                                   if torch.device(device).type == "cuda" else -1)
    finally:
        logger.removeFilter(_wider_isa)
    meta = runner.get_metadata()
    expected = {"model_checksum": checksum, "n_qm": str(n_qm), "dtype": str(dtype),
                "device": torch.device(device).type, "torch_version": torch.__version__}
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} {a} (need {b})" for k, (a, b) in wrong.items())
        raise CompiledModelError(f"compiled model {path} does not fit: {detail}")
    return CompiledPotential(runner)
