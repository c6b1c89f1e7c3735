"""``qmmm-driver label``: reference QM/MM labels from PySCF with electrostatic embedding.

For each frame the QM atoms are computed with Kohn-Sham DFT (default
B3LYP/6-31+G* with density fitting) in the external potential of the MM point
charges (``pyscf.qmmm``). The energy is the QM electrons and nuclei in that
potential, including the Coulomb energy of QM nuclei with MM charges, as the
frame convention defines it. Forces: QM atoms from the analytic gradient, MM
atoms from the field of the QM density and nuclei at each charge. Reference
charges are IAO charges (intrinsic atomic orbitals, a basis-set-robust
population scheme); the dipole is taken about the QM centre of mass.

Runs are resumable: each labelled frame is appended to the output with its
``source_index``; frames whose SCF fails are reported, listed in
``OUTPUT.failed.json`` and skipped. ``--spread`` labels in a fixed shuffled
order, so that a run stopped early leaves an unbiased subset.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .frames import Frame, read_frames, write_frames


class LabelError(RuntimeError):
    """A frame that could not be labelled (SCF failure)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", type=Path, help="unlabelled frames (extended XYZ)")
    parser.add_argument("--out", type=Path, required=True, help="labelled frames (appended; rerun to resume)")
    parser.add_argument("--xc", default="b3lyp", help="exchange-correlation functional (default b3lyp)")
    parser.add_argument("--basis", default="6-31+g*", help="basis set (default 6-31+g*)")
    parser.add_argument("--no-density-fit", action="store_true", help="exact Coulomb/exchange instead of density fitting")
    parser.add_argument("--conv-tol", type=float, default=1e-10, help="SCF energy convergence, Hartree (default 1e-10)")
    parser.add_argument("--threads", type=int, default=None, help="PySCF threads (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="label at most this many new frames")
    parser.add_argument("--spread", action="store_true",
                        help="label frames in a fixed shuffled order, so that an unfinished run is an unbiased "
                             "subset of the file (e.g. covers every umbrella window); resuming keeps the order")
    parser.add_argument("--decimals", type=int, default=6,
                        help="decimals of per-atom numbers in the output (default 6: 1e-6 A, e, eV/A)")


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


def label_frame(frame: Frame, xc: str = "b3lyp", basis: str = "6-31+g*", density_fit: bool = True,
                conv_tol: float = 1e-10, guess: np.ndarray | None = None) -> Frame:
    """Return a copy of ``frame`` with energy, forces on all atoms, IAO charges and dipole.

    ``guess`` is a density matrix to start the SCF from (the previous frame's,
    when consecutive frames are similar); it changes the cost, not the result.
    The converged density matrix is attached to the returned frame as
    ``density`` (not written to files) for use as the next guess.
    """
    from pyscf import gto

    qm, mm = frame.qm_indices, frame.mm_indices
    try:
        mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(frame.numbers[qm], frame.positions[qm])],
                    unit="Bohr", basis=basis, charge=int(frame.qm_total_charge),
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
    forces[qm] = -g_qm
    if len(mm):
        dm = mf.make_rdm1()
        if np.ndim(dm) == 3:
            dm = dm[0] + dm[1]
        forces[mm] = -(grad.grad_hcore_mm(dm) + grad.grad_nuc_mm())
    masses = mol.atom_mass_list(isotope_avg=True)
    com = (masses[:, None] * mol.atom_coords()).sum(axis=0) / masses.sum()
    dipole = np.asarray(mf.dip_moment(unit="AU", origin=com, verbose=0))
    qm_charges = np.zeros(len(frame.numbers))
    qm_charges[qm] = iao_charges(mf)
    info = dict(frame.info, reference=reference_string(xc, basis, density_fit), qm_charges_scheme="iao")
    labelled = Frame(numbers=frame.numbers.copy(), positions=frame.positions.copy(), qm=frame.qm.copy(),
                     mm_charge=frame.mm_charge.copy(), qm_total_charge=frame.qm_total_charge,
                     qm_multiplicity=frame.qm_multiplicity, cell=frame.cell, energy=float(energy),
                     forces=forces, qm_charges=qm_charges, dipole=dipole, info=info)
    labelled.density = mf.make_rdm1()
    return labelled


def completed_indices(out: Path) -> set[int]:
    """``source_index`` of the frames already in ``out``; a torn last frame (killed run) is cut off."""
    import ase.io

    if not out.exists() or out.stat().st_size == 0:
        return set()
    done, good = set(), []
    try:
        for atoms in ase.io.iread(out, index=":", format="extxyz"):
            good.append(atoms)
            done.add(int(atoms.info["source_index"]))
    except Exception:
        print(f"{out}: the last frame is incomplete (interrupted run); keeping the {len(good)} complete frames")
        ase.io.write(out, good, format="extxyz")
    return done


def label_file(source: Path, out: Path, xc: str = "b3lyp", basis: str = "6-31+g*", density_fit: bool = True,
               conv_tol: float = 1e-10, limit: int | None = None, decimals: int = 6,
               progress: bool = True, spread: bool = False) -> tuple[int, int]:
    """Label the frames of ``source`` not yet in ``out``. Returns (labelled, failed) counts of this run."""
    from tqdm import tqdm

    frames = read_frames(source)
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
    for i in bar:
        try:
            labelled = label_frame(frames[i], xc, basis, density_fit, conv_tol, guess)
        except LabelError as err:
            failed[i] = str(err)
            failed_log.write_text(json.dumps(failed, indent=1))
            bar.write(f"frame {i} of {source}: {err}; skipped (listed in {failed_log})")
            n_bad += 1
            continue
        labelled.info["source_index"] = i
        guess = labelled.density
        write_frames(out, [labelled], append=True, decimals=decimals)
        n_ok += 1
    return n_ok, n_bad


def main(args: argparse.Namespace) -> int:
    from pyscf import lib

    lib.num_threads(args.threads or os.cpu_count())
    if args.out.resolve() == args.frames.resolve():
        raise InputError("--out must differ from the input frames")
    n_ok, n_bad = label_file(args.frames, args.out, args.xc, args.basis, not args.no_density_fit,
                             args.conv_tol, args.limit, args.decimals, spread=args.spread)
    print(f"labelled {n_ok} frames into {args.out}; {n_bad} failed")
    return 0
