"""The periodic embedding: minimum image of whole molecules, refused cells, smooth cutoff, bad coordinates."""

import numpy as np
import pytest
import torch

from qmmm_driver.embedding import Embedding, NonFiniteInput
from qmmm_driver.nn.blocks import switch
from qmmm_driver.structures import QMMMStructure
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import water_box, water_cluster

DT = torch.float64


def brute_force_images(atoms, r_off_bohr):
    """Molecule images nearest the QM centre by explicit search over 5^3 images."""
    pos = atoms.positions * ANGSTROM_TO_BOHR  # unwrapped: molecules whole
    cell = atoms.cell.array * ANGSTROM_TO_BOHR
    qm = np.flatnonzero(atoms.arrays["qm"] == 1)
    centre = pos[qm].mean(axis=0)
    shifts = np.array([[a, b, c] for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]) @ cell
    out = {}
    n = len(atoms)
    for start in range(3, n, 3):
        mol = pos[start:start + 3]
        cands = mol.mean(axis=0) + shifts - centre
        k = int(np.argmin(np.linalg.norm(cands, axis=1)))
        if np.linalg.norm(cands[k]) < r_off_bohr:
            out[start] = mol + shifts[k]
    return out


@pytest.mark.parametrize("triclinic", [False, True])
def test_minimum_image_of_whole_molecules(triclinic):
    """Atoms wrapped one by one (molecules split across the cell) come back whole at the nearest image."""
    atoms = water_box(triclinic=triclinic)
    expected = brute_force_images(atoms, 12.0 * ANGSTROM_TO_BOHR)
    wrapped = atoms.copy()
    wrapped.translate([7.3, -4.1, 2.2])
    wrapped.wrap()
    emb = Embedding(QMMMStructure.from_atoms(wrapped), 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    pos = torch.as_tensor(wrapped.positions * ANGSTROM_TO_BOHR)[None]
    cell = torch.as_tensor(wrapped.cell.array * ANGSTROM_TO_BOHR)[None]
    p = emb.present(pos, cell)
    # compare in the frame of the (whole) QM molecule
    shift_qm = (atoms.positions[0] - wrapped.positions[0]) * ANGSTROM_TO_BOHR
    qm_ref = atoms.positions[:3] * ANGSTROM_TO_BOHR
    # undo the arbitrary global translation: compare relative to the QM oxygen
    got_qm = p.qm_pos[0].numpy() + shift_qm
    assert np.allclose(got_qm, qm_ref, atol=1e-9)
    real = p.mm_atom[0] >= 0
    mm_atoms = p.mm_atom[0][real].numpy()
    got = p.mm_pos[0][real].numpy() + shift_qm
    starts = sorted(set((mm_atoms // 3 * 3).tolist()))
    assert starts == sorted(expected)
    assert len(starts) > 100
    for s in starts:
        rows = np.flatnonzero(mm_atoms // 3 * 3 == s)
        assert np.allclose(got[rows], expected[s], atol=1e-9)


def test_small_cell_is_refused():
    atoms = water_box(n_side=6)  # 19.5 A box < 2 * 12 A
    emb = Embedding(QMMMStructure.from_atoms(atoms), 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    with pytest.raises(ValueError, match="too small for the MM cutoff"):
        emb.present(torch.as_tensor(atoms.positions * ANGSTROM_TO_BOHR)[None],
                    torch.as_tensor(atoms.cell.array * ANGSTROM_TO_BOHR)[None])


def test_switch_values_and_derivatives_continuous():
    r_on, r_off = 10.0, 12.0
    d = torch.linspace(9.0, 13.0, 4001, dtype=DT, requires_grad=True)
    s = switch(d, r_on, r_off)
    (ds,) = torch.autograd.grad(s.sum(), d)
    s = s.detach()
    assert float(s[d < r_on].min()) == 1.0 and float(s[d > r_off].max()) == 0.0
    assert float(s.diff().abs().max()) < 2e-3          # no jumps
    assert float(ds.diff().abs().max()) < 5e-3         # continuous first derivative
    assert float(ds[(d - r_on).abs() < 1e-3].abs().max()) < 1e-5
    assert float(ds[(d - r_off).abs() < 1e-3].abs().max()) < 1e-5


def test_energy_and_force_continuous_when_a_molecule_crosses_the_cutoff():
    """Move one MM water radially through r_on..r_off: the electrostatic energy with fixed QM charges
    is continuous, vanishes beyond r_off, and its force matches finite differences everywhere."""
    atoms = water_box()
    r_on, r_off = 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR
    emb = Embedding(QMMMStructure.from_atoms(atoms), r_on, r_off)
    cell = torch.as_tensor(atoms.cell.array * ANGSTROM_TO_BOHR)[None]
    base = torch.as_tensor(atoms.positions * ANGSTROM_TO_BOHR)
    centre = base[:3].mean(dim=0)
    mover = 30  # atoms 30..32 are one MM water
    qm_charges = torch.tensor([-0.8, 0.4, 0.4], dtype=DT)

    def energy(dist):
        pos = base.clone()
        mol = pos[mover:mover + 3]
        direction = torch.tensor([0.3, 0.5, 0.81], dtype=DT)
        direction /= direction.norm()
        pos[mover:mover + 3] = mol - mol.mean(dim=0) + centre + dist * direction
        p = emb.present(pos[None], cell)
        qm = p.qm_pos.clone().requires_grad_(True)
        mm = p.mm_pos.clone().requires_grad_(True)
        q = p.charges(qm, mm)[0]
        sel = (p.mm_atom[0] >= mover) & (p.mm_atom[0] < mover + 3)
        if not bool(sel.any()):
            return 0.0, 0.0
        e = (qm_charges[:, None] * q[sel][None] / torch.cdist(qm[0], mm[0][sel])).sum()
        (g,) = torch.autograd.grad(e, mm)
        force_along = -float((g[0][sel].sum(dim=0) * direction).sum())
        return float(e.detach()), force_along

    dists = np.linspace(r_on - 1.0, r_off + 1.0, 241)
    values = [energy(float(d)) for d in dists]
    e = np.array([v[0] for v in values])
    f = np.array([v[1] for v in values])
    assert np.all(e[dists > r_off + 1e-6] == 0.0)
    assert np.abs(np.diff(e)).max() < 5e-5
    fd = -(e[2:] - e[:-2]) / (dists[2:] - dists[:-2])
    assert np.allclose(fd, f[1:-1], atol=5e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_non_finite_coordinates_are_refused_before_any_atom_is_culled(periodic):
    """A NaN on an MM atom must not be dropped with the molecules beyond the cutoff (it would give a finite,
    wrong energy): it is refused, naming the atom."""
    atoms = water_box() if periodic else water_cluster()
    structure = QMMMStructure.from_atoms(atoms)
    emb = Embedding(structure, 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    pos = torch.as_tensor(structure.positions)[None].clone()
    pos[0, 40, 1] = float("nan")
    cell = torch.as_tensor(structure.cell)[None] if periodic else None
    with pytest.raises(NonFiniteInput, match="position of MM atom 40 in frame 0 is not finite"):
        emb.present(pos, cell)


def test_padding_is_zero_charge_far_away():
    """Frames with different numbers of kept molecules share one padded batch."""
    atoms = water_box()
    structure = QMMMStructure.from_atoms(atoms)
    emb = Embedding(structure, 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    pos = torch.as_tensor(structure.positions)[None].repeat(2, 1, 1)
    pos[1, :3] += torch.tensor([4.0, 0.0, 0.0], dtype=DT)  # the QM water moves: other molecules in range
    p = emb.present(pos, torch.as_tensor(structure.cell)[None].repeat(2, 1, 1))
    pad = p.mm_atom < 0
    assert bool(pad.any())
    assert bool((p.mm_charge[pad] == 0).all())
    assert float((p.mm_pos - p.qm_pos.mean(dim=1, keepdim=True)).norm(dim=-1)[pad].min()) > 1e5
