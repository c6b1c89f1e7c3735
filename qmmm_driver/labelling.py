"""``qmmm-driver label``: reference QM/MM labels from PySCF with electrostatic embedding.

For each frame the QM atoms are computed with Kohn-Sham DFT (default
B3LYP/6-31+G* with density fitting) in the external potential of the MM point
charges (``pyscf.qmmm``). The energy is the QM electrons and nuclei in that
potential, including the Coulomb energy of QM nuclei with MM charges, as the
frame convention defines it. Forces: QM atoms from the analytic gradient, MM
atoms from the field of the QM density and nuclei at each charge. A frame with
cut bonds (``qm_link``) gets a link hydrogen on each (:mod:`qmmm_driver.boundary`)
in the QM molecule; its force goes to the QM and MM atom of the bond by the chain
rule, its charge to the QM atom. Reference
charges are IAO charges (intrinsic atomic orbitals, a basis-set-robust
population scheme); the dipole is taken about the QM centre of mass.

Runs are resumable: each labelled frame is appended to the output with its
``source_index``; frames whose SCF fails are reported, listed in
``OUTPUT.failed.json`` and skipped. ``--spread`` labels in a fixed shuffled
order, so that a run stopped early leaves an unbiased subset. A run killed
while appending leaves at most a torn last frame; the next run detects it (a
missing line or a last line cut inside a number) and rewrites the file
atomically without it. PySCF's scratch files go to a private directory that is
removed at the end, and on the next start if a killed run left one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from .boundary import link_positions
from .files import write_atomically
from .structures import QMMMStructure, complete_frames, read_structures, write_structures


class LabelError(RuntimeError):
    """A frame that could not be labelled (SCF failure)."""


def _scf(mol, xc: str, density_fit: bool, coords: np.ndarray, charges: np.ndarray, conv_tol: float):
    from pyscf import dft, qmmm

    mf = dft.RKS(mol) if mol.spin == 0 else dft.UKS(mol)
    mf.xc = xc
    if density_fit:
        mf = mf.density_fit()
    if len(charges):
        mf = qmmm.mm_charge(mf, coords, charges, unit="Bohr")
    mf.conv_tol = conv_tol
    mf.max_cycle = 100
    mf.verbose = 0
    mf.chkfile = None  # no checkpoint file: labels go to the output, nothing to resume inside one SCF
    return mf


def iao_charges(mf) -> np.ndarray:
    """IAO (intrinsic atomic orbital) charges of the QM atoms."""
    from pyscf import lo

    mol = mf.mol
    occ = mf.mo_occ
    if np.ndim(occ) == 1:
        coeff = mf.mo_coeff[:, occ > 0]
        iaos = lo.vec_lowdin(lo.iao.iao(mol, coeff), mf.get_ovlp())
        _, chg = lo.iao.fast_iao_mullikan_pop(mol, mf.make_rdm1(), iaos, verbose=0)
        return np.asarray(chg)
    # open shell: IAOs from both spin channels' occupied orbitals
    coeff = np.hstack([mf.mo_coeff[s][:, occ[s] > 0] for s in (0, 1)])
    iaos = lo.vec_lowdin(lo.iao.iao(mol, coeff), mf.get_ovlp())
    _, chg = lo.iao.fast_iao_mullikan_pop(mol, mf.make_rdm1(), iaos, verbose=0)
    return np.asarray(chg)


def reference_string(xc: str, basis: str, density_fit: bool) -> str:
    import pyscf

    fit = ", density fitting" if density_fit else ""
    return f"{xc.upper()}/{basis}{fit}, PySCF {pyscf.__version__}, MM point charges (electrostatic embedding)"


def label_frame(frame: QMMMStructure, xc: str = "b3lyp", basis: str = "6-31+g*", density_fit: bool = True,
                conv_tol: float = 1e-10, guess: np.ndarray | None = None) -> QMMMStructure:
    """Return a copy of ``frame`` with energy, forces on all atoms, IAO charges and dipole.

    ``guess`` is a density matrix to start the SCF from (the previous frame's,
    when consecutive frames are similar); it changes the cost, not the result.
    The converged density matrix is attached to the returned frame as
    ``density`` (not written to files) for use as the next guess.
    """
    from pyscf import gto

    qm, mm = frame.qm_indices, frame.mm_indices
    links, g = frame.links, frame.link_g
    link_pos = link_positions(frame.positions, links, g)  # hydrogens capping the cut bonds (boundary.py)
    atoms = [(int(z), tuple(p)) for z, p in zip(frame.numbers[qm], frame.positions[qm])] + \
        [(1, tuple(p)) for p in link_pos]
    try:
        mol = gto.M(atom=atoms, unit="Bohr", basis=basis, charge=int(frame.qm_total_charge),
                    spin=int(frame.qm_multiplicity) - 1, verbose=0)
    except (RuntimeError, ValueError, KeyError) as err:
        raise LabelError(f"cannot set up the QM region (charge {frame.qm_total_charge}, multiplicity "
                         f"{frame.qm_multiplicity}, basis {basis}): {err}") from err
    coords, charges = frame.positions[mm], frame.mm_charge[mm]
    mf = _scf(mol, xc, density_fit, coords, charges, conv_tol)
    usable = guess is not None and np.shape(guess)[-1] == mol.nao
    energy = mf.kernel(dm0=guess) if usable else mf.kernel()
    if not mf.converged:
        mf = mf.newton()
        energy = mf.kernel()
    if not mf.converged or not np.isfinite(energy):
        raise LabelError(f"SCF did not converge (last energy {energy})")
    grad = mf.nuc_grad_method()
    grad.verbose = 0
    g_qm = grad.kernel()
    forces = np.zeros_like(frame.positions)
    forces[qm] = -g_qm[:len(qm)]
    if len(mm):
        dm = mf.make_rdm1()
        if np.ndim(dm) == 3:
            dm = dm[0] + dm[1]
        forces[mm] = -(grad.grad_hcore_mm(dm) + grad.grad_nuc_mm())
    for (q1, m1), gk, f in zip(links, g, -g_qm[len(qm):]):  # a link hydrogen's force, by the chain rule
        forces[q1] += (1.0 - gk) * f
        forces[m1] += gk * f
    masses = mol.atom_mass_list(isotope_avg=True)
    com = (masses[:, None] * mol.atom_coords()).sum(axis=0) / masses.sum()
    dipole = np.asarray(mf.dip_moment(unit="AU", origin=com, verbose=0))
    qm_charges = np.zeros(len(frame.numbers))
    population = iao_charges(mf)
    qm_charges[qm] = population[:len(qm)]
    np.add.at(qm_charges, links[:, 0], population[len(qm):])  # a link hydrogen's charge counts on its QM atom
    info = dict(frame.info, reference=reference_string(xc, basis, density_fit), qm_charges_scheme="iao")
    labelled = replace(frame, energy=float(energy), forces=forces, qm_charges=qm_charges, dipole=dipole, info=info)
    labelled.density = mf.make_rdm1()
    return labelled


def completed_indices(out: Path) -> set[int]:
    """``source_index`` of the frames already in ``out``; a torn last frame (killed run) is cut off atomically."""
    import ase.io

    for tmp in out.parent.glob(f".{out.name}.*.tmp"):  # the rewrite of a run killed while it repaired the file
        tmp.unlink(missing_ok=True)
    if not out.exists() or out.stat().st_size == 0:
        return set()
    size, count = complete_frames(out)
    if size < out.stat().st_size:
        print(f"{out}: the last frame is incomplete (interrupted run); keeping the {count} complete frames")
        write_atomically(out, out.read_bytes()[:size])
    if count == 0:
        return set()
    return {int(a.info["source_index"]) for a in ase.io.iread(out, index=":", format="extxyz")}


@contextmanager
def scratch_directory(out: Path):
    """A private scratch directory for PySCF, removed at the end; those of earlier runs whose process
    is gone (killed) are removed first."""
    from pyscf import lib

    base = Path(tempfile.gettempdir())
    for old in base.glob("qmmm-driver-label-*"):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
    path = base / f"qmmm-driver-label-{os.getpid()}"
    path.mkdir(exist_ok=True)
    previous = lib.param.TMPDIR
    lib.param.TMPDIR = str(path)
    try:
        yield path
    finally:
        lib.param.TMPDIR = previous
        shutil.rmtree(path, ignore_errors=True)


def label_file(source: Path, out: Path, xc: str = "b3lyp", basis: str = "6-31+g*", density_fit: bool = True,
               conv_tol: float = 1e-10, limit: int | None = None, decimals: int = 6,
               progress: bool = True, spread: bool = False) -> tuple[int, int]:
    """Label the frames of ``source`` not yet in ``out``. Returns (labelled, failed) counts of this run."""
    from tqdm import tqdm

    frames = read_structures(source)
    failed_log = out.with_name(out.name + ".failed.json")
    failed = {int(k): v for k, v in json.loads(failed_log.read_text()).items()} if failed_log.exists() else {}
    done = completed_indices(out)
    order = np.random.default_rng(0).permutation(len(frames)) if spread else range(len(frames))
    todo = [int(i) for i in order if i not in done and i not in failed]
    if limit is not None:
        todo = todo[:limit]
    n_ok = n_bad = 0
    bar = tqdm(todo, desc=f"labelling {source.name}", unit="frame", disable=not progress)
    guess = None
    with scratch_directory(out):
        for i in bar:
            try:
                labelled = label_frame(frames[i], xc, basis, density_fit, conv_tol, guess)
            except LabelError as err:
                failed[i] = str(err)
                write_atomically(failed_log, json.dumps(failed, indent=1))
                bar.write(f"frame {i} of {source}: {err}; skipped (listed in {failed_log})")
                n_bad += 1
                continue
            labelled.info["source_index"] = i
            guess = labelled.density
            write_structures(out, [labelled], append=True, decimals=decimals)
            n_ok += 1
    return n_ok, n_bad
