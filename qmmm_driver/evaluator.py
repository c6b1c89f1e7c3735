"""The evaluator protocol and the one evaluation path of the model.

An evaluator turns positions of a QM/MM structure into energy, forces, virial
and extras, for a batch of frames, in atomic units (Bohr, Hartree, e; cells as
rows of lattice vectors). Parameters that i-PI may set per forcefield
(``<parameters>`` in the ``<ffsocket>``, sent with INIT) come with every
request, checked against the evaluator's :attr:`~Evaluator.parameters`.

:class:`ModelEvaluator` is the model's: the i-PI worker, the batched PES for
i-PI's own driver, the ASE calculator and ``qmmm-driver evaluate`` all call it,
so they cannot disagree. The MM worker's OpenMM evaluator follows the same
protocol (:mod:`qmmm_driver.mm.forcefield`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import torch

from .domain import DomainCheck
from .embedding import Embedding, NonFiniteInput, Presented
from .errors import InputError
from .nn import QMMMModel
from .nn.io import ModelFileError, load_model
from .nn.potential import Potential
from .profiling import stage
from .structures import QMMMStructure, StructureError


class NonFiniteResult(RuntimeError):
    """The evaluation produced (or was given) NaN or infinite numbers: nothing may be sent to i-PI."""


class Evaluator(Protocol):
    """What a socket client, an i-PI PES or a calculator needs of a force provider."""

    #: the structure whose configurations are evaluated (atom order, QM region)
    structure: QMMMStructure
    #: parameters i-PI may set with INIT: name -> (type, default, help)
    parameters: dict[str, tuple[type, object, str]]

    def compute(self, positions: np.ndarray, cells: np.ndarray | None, params: Mapping[str, object]) -> "Results":
        """Frames ``positions`` [B, N, 3] (Bohr) in ``cells`` [B, 3, 3] (rows, Bohr; None for a cluster)."""


def check_parameters(evaluator: Evaluator, params: Mapping[str, object], where: str) -> dict:
    """``params`` completed with the evaluator's defaults; unknown names and bad values are refused."""
    known = evaluator.parameters
    unknown = sorted(set(params) - set(known))
    if unknown:
        described = ", ".join(f"{k} ({h})" for k, (_, _, h) in known.items()) or "none"
        raise InputError(f"unknown parameter(s) {unknown} in {where}; this forcefield understands: {described}")
    out = {k: default for k, (_, default, _) in known.items()}
    for key, value in params.items():
        kind = known[key][0]
        try:
            out[key] = kind(value)
        except (TypeError, ValueError) as err:
            why = str(err) if kind not in (int, float, str) else f"not a {kind.__name__}"
            raise InputError(f"parameter '{key}' in {where} is {value!r}: {why}") from None
        if kind is float and not np.isfinite(out[key]):
            raise InputError(f"parameter '{key}' in {where} is {value}; it must be finite")
    return out


@dataclass
class Results:
    """Results for a batch of B frames of N atoms (atomic units, float64)."""

    energy: np.ndarray          # [B] Hartree
    forces: np.ndarray          # [B, N, 3] Hartree/Bohr, on every atom
    virial: np.ndarray          # [B, 3, 3] Hartree, sum_i F_i (x) r_i
    qm_charges: np.ndarray      # [B, n_qm] e
    dipole: np.ndarray          # [B, 3] e*Bohr, about the QM centre of mass
    n_mm_embedded: np.ndarray   # [B] MM atoms inside the cutoff

    def extras(self, b: int, structure: QMMMStructure) -> dict:
        """The i-PI ``extras`` dictionary of frame ``b`` (the same keys for every frame)."""
        return {
            "qm_charges": self.qm_charges[b].tolist(),
            "dipole": self.dipole[b].tolist(),
            "qm_indices": structure.qm_indices.tolist(),
            "n_mm_embedded": int(self.n_mm_embedded[b]),
            "units": "atomic (e, e*bohr)",
        }


def species_of(model: QMMMModel, structure: QMMMStructure) -> list[int]:
    """Index of each QM atom's element in the model's element list, then one H per link atom."""
    known = model.elements
    out = []
    for atom, symbol in zip(structure.qm_indices, structure.qm_symbols):
        if symbol not in known:
            raise StructureError(f"QM atom {int(atom)} of {structure.source} is {symbol}, which the model does "
                                 f"not know (its elements: {', '.join(known)})")
        out.append(known.index(symbol))
    if len(structure.links):
        if "H" not in known:
            raise StructureError(f"{structure.source} cuts covalent bonds (link hydrogens), but the model knows no H")
        out += [known.index("H")] * len(structure.links)
    return out


def load(path: str | Path, device: str | torch.device = "cpu") -> QMMMModel:
    """:func:`~qmmm_driver.nn.io.load_model` with its errors as input errors (exit status 2)."""
    try:
        return load_model(path, device)
    except ModelFileError as err:
        raise InputError(str(err)) from err


def near_atoms(qm: torch.Tensor, mm: torch.Tensor, mm_atom: torch.Tensor, radius: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, m] (into the M axis) of the real MM atoms within ``radius`` of a QM atom, and a 0/1 mask.

    At least two entries per frame (the compiled model takes sizes of 1 or more;
    the mask makes padding entries count for nothing). Positions in the model's
    precision, relative to a QM atom: an atom within rounding of the radius may go
    either way, and the short-range terms vanish smoothly there.
    """
    with torch.no_grad():
        # squared distances as |q|^2 - 2 q.m + |m|^2: one matrix product, no [B, n, M, 3] differences
        d2 = torch.baddbmm((qm * qm).sum(-1, keepdim=True), qm, mm.transpose(1, 2), alpha=-2.0)
        close = ((d2 + (mm * mm).sum(-1)[:, None]).amin(dim=1) < radius * radius) & (mm_atom >= 0)  # [B, M]
        if close.shape[0] == 1:  # one frame: no padding between frames, a few operations fewer
            order = torch.nonzero(close[0]).T
            mask = torch.ones(order.shape, dtype=torch.bool, device=qm.device)
            if order.shape[1] < 2:
                pad = 2 - order.shape[1]
                order = torch.cat([order, order.new_zeros(1, pad)], dim=1)
                mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1)
            return order, mask
        count = close.sum(dim=1)
        width = max(int(count.max()) if close.numel() else 0, 2)
        order = torch.argsort((~close).to(torch.int8), dim=1, stable=True)[:, :width]
        if order.shape[1] < width:  # fewer than two MM atoms at all
            order = torch.nn.functional.pad(order, (0, width - order.shape[1]))
        mask = torch.arange(width, device=qm.device)[None, :] < count[:, None]
    return order, mask


class ModelEvaluator:
    """Evaluates a model on configurations of ``structure`` on one device.

    ``dtype`` is the model's precision (float32 or float64); the embedding and
    the energies are float64. ``compiled`` is an ahead-of-time compiled form of
    the model's :class:`~qmmm_driver.nn.potential.Potential` (the eager one
    otherwise). Parameter: ``coupling`` scales every MM charge (the QM-MM
    electrostatic coupling strength, 1 by default). A QM geometry outside the model's
    training domain is reported as an :class:`~qmmm_driver.domain.ExtrapolationWarning`
    (:attr:`domain`; None for a model file that does not record its domain).
    """

    parameters = {"coupling": (float, 1.0, "scales every MM charge (QM-MM electrostatic coupling), e.g. for "
                                            "Hamiltonian REMD")}

    def __init__(self, model: QMMMModel, structure: QMMMStructure, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, compiled=None):
        self.device = torch.device(device)
        self.dtype = dtype
        if self.device.type == "cpu":
            # subnormal floats (sigmoids of large negative arguments, say) are physically zero but make the
            # CPU's arithmetic on them many times slower: a compiled model ran 2x slower with them
            torch.set_flush_denormal(True)
        self.model = model.to(self.device, dtype).eval()
        self.structure = structure
        s = model.settings
        self.embedding = Embedding(structure, s.mm_switch_on, s.mm_switch_off, self.device)
        self.potential = compiled if compiled is not None else Potential(self.model)
        self.compiled = compiled is not None
        self.near_radius = s.short_range_cutoff if s.short_range else 0.0
        self._species = torch.as_tensor(species_of(model, structure), device=self.device)
        self._total = float(structure.qm_total_charge)
        self._link_g = torch.as_tensor(structure.link_g, device=self.device, dtype=torch.float64)[None, :, None]
        self._per_batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # B -> (species, total charges)
        names = [f"QM atom {int(i)}" for i in structure.qm_indices]
        names += [f"the link H of the bond {int(q)}-{int(m)}" for q, m in structure.links]
        self.domain = DomainCheck.of_model(model, self._species.cpu().numpy(), names)

    def _batch_constants(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        if B not in self._per_batch:
            self._per_batch[B] = (self._species.expand(B, -1).contiguous(),
                                  torch.full((B,), self._total, device=self.device, dtype=self.dtype))
        return self._per_batch[B]

    def present(self, positions: np.ndarray, cells: np.ndarray | None) -> Presented:
        """Frames ``positions`` [B, N, 3] (Bohr, float64) as the model sees them."""
        if positions.shape[1] != self.structure.n_atoms:
            self.structure.check_atoms(positions.shape[1])
        pos = torch.as_tensor(positions, device=self.device)
        cell_t = None
        if cells is not None and self.structure.periodic:
            cell_t = torch.as_tensor(np.asarray(cells, dtype=np.float64), device=self.device).reshape(-1, 3, 3)
        return self.embedding.present(pos, cell_t)

    def compute(self, positions: np.ndarray, cells: np.ndarray | None = None,
                params: Mapping[str, object] | None = None) -> Results:
        """Evaluate frames ``positions`` [B, N, 3] (or [N, 3]) with ``cells`` [B, 3, 3] (Bohr)."""
        coupling = float((params or {}).get("coupling", 1.0))
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim == 2:
            positions = positions[None]
        with stage("qmmm:present"):
            try:
                p = self.present(positions, cells)
            except NonFiniteInput as err:
                raise NonFiniteResult(str(err)) from err
        B = p.n_frames
        with stage("qmmm:model"):
            # relative to each frame's first QM atom: exact by translation invariance, and kind to float32
            origin = p.qm_pos[:, :1]
            links = p.m1_pos is not None
            leaves = p.group is not None or links  # gradients to chain outside the potential
            qm = (p.qm_pos - origin).requires_grad_(leaves)
            mm = (p.mm_pos - origin).requires_grad_(p.group is not None)
            qm_all, m1 = qm, None
            if links:  # link hydrogens on the cut bonds, moving with their QM and MM atoms
                m1 = (p.m1_pos - origin).requires_grad_(True)
                q1 = qm[:, self.embedding.link_q1]
                qm_all = torch.cat([qm, q1 + self._link_g * (m1 - q1)], dim=1)
            if self.domain is not None:  # warns when the QM geometry leaves the training domain
                self.domain.check(qm_all.detach().cpu().numpy())
            charges = p.charges(qm, mm)
            if coupling != 1.0:
                charges = charges * coupling
            qm_in, mm_in = qm_all.detach().to(self.dtype), mm.detach().to(self.dtype)
            near, mask = near_atoms(qm_in, mm_in, p.mm_atom, self.near_radius)
            species, total = self._batch_constants(B)
            inputs = (species, qm_in, mm_in, charges.detach().to(self.dtype), near, mask.to(self.dtype), total)
            # dense memory: a compiled potential reads its inputs as contiguous arrays
            energy, g_all, g_mm, g_q, qm_charges, dipole = self.potential(*(t.contiguous() for t in inputs))
            g_all, g_mm, g_m1 = g_all.double(), g_mm.double(), None
            if leaves:  # chain rule through the link atoms and the switched charges
                outputs = [(qm_all, g_all)] + ([(charges, g_q.double())] if p.group is not None else [])
                wrt = [t for t in (qm, mm, m1) if t is not None and t.requires_grad]
                grads = dict(zip(map(id, wrt), torch.autograd.grad([o for o, _ in outputs], wrt,
                                                                   [g for _, g in outputs], allow_unused=True)))
                g_qm = grads[id(qm)]
                if grads.get(id(mm)) is not None:
                    g_mm = g_mm + grads[id(mm)]
                g_m1 = grads[id(m1)] if links else None
            else:
                g_qm = g_all
            n_qm = qm.shape[1]
            if links:  # each link atom's charge counted on its QM atom (the QM total stays exact)
                qm_charges = qm_charges[:, :n_qm].index_add(1, self.embedding.link_q1, qm_charges[:, n_qm:])
        with stage("qmmm:assemble"):
            if p.group is None:
                forces, virial = self._cluster_forces(positions, g_qm, g_mm, g_m1)
            else:
                forces, virial = self._periodic_forces(p, qm.detach() + origin, mm.detach() + origin, g_qm, g_mm,
                                                       None if m1 is None else (m1.detach() + origin, g_m1))
            res = Results(energy=energy.double().cpu().numpy(), forces=forces, virial=virial,
                          qm_charges=qm_charges.double().cpu().numpy(), dipole=dipole.double().cpu().numpy(),
                          n_mm_embedded=(p.mm_atom >= 0).sum(dim=1).cpu().numpy())
            self._check_finite(res, p)
            return res

    def _cluster_forces(self, positions: np.ndarray, g_qm, g_mm, g_m1) -> tuple[np.ndarray, np.ndarray]:
        """Forces and virials of clusters, on the host: every atom is presented once, where it is, so the
        virial is ``sum_i F_i (x) r_i`` over the frames' own positions."""
        emb = self.embedding
        forces = np.zeros(positions.shape)
        forces[:, emb.qm_idx_host] = -g_qm.cpu().numpy()
        forces[:, emb.mm_idx_host] = -g_mm.cpu().numpy()
        if g_m1 is not None:  # the link hydrogens' share on the MM atoms of the cut bonds
            np.add.at(forces, (slice(None), emb.link_m1_host), -g_m1.cpu().numpy())
        return forces, forces.transpose(0, 2, 1) @ positions

    def _periodic_forces(self, p: Presented, qm, mm, g_qm, g_mm, link=None) -> tuple[np.ndarray, np.ndarray]:
        """Forces on the original atoms and virials of periodic frames (on the device, float64): gradients of
        the presented images summed onto their atoms, the virial over the images' positions; ``link``: the
        positions of the cut bonds' MM atoms and the gradients that reach them through the link hydrogens."""
        B, n = p.n_frames, self.structure.n_atoms
        forces = torch.zeros(B, n + 1, 3, device=self.device, dtype=torch.float64)  # slot n: padding
        forces[:, self.embedding.qm_idx] = -g_qm
        forces.scatter_add_(1, torch.where(p.mm_atom >= 0, p.mm_atom, n)[..., None].expand(-1, -1, 3), -g_mm)
        virial = -(torch.bmm(g_qm.transpose(1, 2), qm) + torch.bmm(g_mm.transpose(1, 2), mm))
        if link is not None:
            m1_pos, g_m1 = link
            forces.index_add_(1, self.embedding.link_m1, -g_m1)
            virial = virial - torch.bmm(g_m1.transpose(1, 2), m1_pos)
        return forces[:, :n].cpu().numpy(), virial.cpu().numpy()

    def _check_finite(self, res: Results, p: Presented) -> None:
        bad = ~(np.isfinite(res.energy) & np.isfinite(res.forces).all(axis=(1, 2)) & np.isfinite(res.virial).all(axis=(1, 2)))
        if not bad.any():
            return
        b = int(np.flatnonzero(bad)[0])
        detail = ""
        real = p.mm_atom[b] >= 0
        if bool(real.any()):
            d = torch.cdist(p.qm_pos[b], p.mm_pos[b][real])
            k = int(torch.argmin(d))
            i, j = divmod(k, int(real.sum()))
            detail = (f"; closest QM-MM pair: atoms {int(self.embedding.qm_idx[i])} and "
                      f"{int(p.mm_atom[b][real][j])} at {float(d.flatten()[k]):.3f} bohr")
        raise NonFiniteResult(f"the model gave a non-finite energy or force for frame {b}{detail}")
