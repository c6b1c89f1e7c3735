"""Labelled frames as training tensors, computed once: the MM environment split into near and far.

For every frame (a cluster, as ``qmmm-driver sample`` writes them) the MM atoms
within ``near_radius`` of a QM atom are kept explicitly (positions, charges,
reference forces): their forces enter the loss and the short-range features see
them. All other MM charges are folded into their Taylor tensors at the QM atoms,
up to order K + 1, computed once: the next order gives the exact first derivative
of the tensors with respect to the QM positions
(:func:`~qmmm_driver.nn.multipoles.linearised_tensors`), so energies and QM
forces equal those of the full evaluation while an epoch never touches the far
atoms again.

Frames with the same number of QM atoms (and of cut bonds) are stacked into one
:class:`FrameSet` (near atoms padded with zero charges far away); a batch is a
selection of rows. A cut bond's link hydrogen is placed on the bond from the QM
atom and the MM atom (always a near atom) at every evaluation
(:func:`with_links`), so that forces reach both by the chain rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..embedding import PADDING_DISTANCE
from ..errors import InputError
from ..nn.multipoles import taylor_tensors
from ..boundary import link_positions
from ..structures import QMMMStructure, read_structures


@dataclass
class FrameSet:
    """Frames of ``n`` QM atoms each (atomic units, float64); labels are None where any frame lacks them."""

    index: torch.Tensor          # [F] position of each frame in the list it came from
    species: torch.Tensor        # [F, n + l]: the QM atoms, then one H per link atom
    qm: torch.Tensor             # [F, n, 3] relative to the first QM atom
    far: torch.Tensor            # [F, n + l, (K+2)^2] Taylor tensors of the far MM charges, orders 0..K+1
    link_q1: torch.Tensor        # [F, l] the QM atom (0..n-1) of each cut bond
    link_m1: torch.Tensor        # [F, l] its MM atom, as an index into the near atoms
    link_g: torch.Tensor         # [F, l] where the link hydrogen sits on the bond
    near_pos: torch.Tensor       # [F, m, 3], nearest first
    near_charge: torch.Tensor    # [F, m] (0 for padding)
    n_short: int                 # the first n_short near atoms hold all within the short-range cutoff
    near_scored: torch.Tensor    # [F, m] bool: MM force within the loss radius
    total_charge: torch.Tensor   # [F]
    weight: torch.Tensor         # [F] how much each frame counts in the loss (1 by default)
    energy: torch.Tensor | None          # [F] Hartree
    qm_forces: torch.Tensor | None       # [F, n, 3]
    near_forces: torch.Tensor | None     # [F, m, 3]
    qm_charges: torch.Tensor | None      # [F, n]
    dipole: torch.Tensor | None          # [F, 3] e Bohr

    def __len__(self) -> int:
        return self.index.numel()

    def select(self, rows: torch.Tensor, device=None) -> "FrameSet":
        """The frames ``rows`` (a batch), optionally moved to ``device``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows].to(device) if device else value[rows]
            out[f.name] = value
        return FrameSet(**out)


def with_links(batch: "FrameSet", qm: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """QM positions [B, n + l, 3]: ``qm`` [B, n, 3] followed by the link hydrogens on the cut bonds."""
    if batch.link_q1.shape[1] == 0:
        return qm
    idx = batch.link_q1[..., None].expand(-1, -1, 3)
    q1 = torch.gather(qm, 1, idx)
    m1 = torch.gather(near, 1, batch.link_m1[..., None].expand(-1, -1, 3))
    return torch.cat([qm, q1 + batch.link_g[..., None].to(qm.dtype) * (m1 - q1)], dim=1)


def fold_link_charges(batch: "FrameSet", charges: torch.Tensor) -> torch.Tensor:
    """Charges [B, n] of the QM atoms, each link hydrogen's added to its QM atom."""
    n = batch.qm.shape[1]
    if batch.link_q1.shape[1] == 0:
        return charges
    return charges[:, :n].scatter_add(1, batch.link_q1, charges[:, n:])


def elements_of(structures: list[QMMMStructure]) -> list[str]:
    """QM elements present in the frames, in order of atomic number."""
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in sorted({int(z) for s in structures for z in s.numbers[s.qm]})]


def prepare(structures: list[QMMMStructure], elements: list[str], env_order: int, near_radius: float,
            loss_radius: float, short_radius: float = 0.0, weights: list[float] | None = None) -> list[FrameSet]:
    """The frames as :class:`FrameSet` s, one per QM atom count; radii in Bohr (``short_radius``: the model's
    short-range cutoff, which the near atoms passed to the model must cover); ``weights``: of each frame in
    the loss (1 each by default)."""
    weights = [1.0] * len(structures) if weights is None else weights
    index = {e: k for k, e in enumerate(elements)}
    groups: dict[tuple[int, int], list[int]] = {}
    for k, s in enumerate(structures):
        if s.periodic:
            raise InputError(f"{s.source}: training frames must be clusters (no cell), presented as the driver "
                             "presents them (qmmm-driver sample writes such frames)")
        for symbol in s.qm_symbols + (["H"] if len(s.links) else []):
            if symbol not in index:
                raise InputError(f"{s.source} has QM element {symbol}, which the model does not know ({elements})")
        groups.setdefault((s.n_qm, len(s.links)), []).append(k)
    return [_stack([structures[k] for k in ks], ks, [weights[k] for k in ks], index, env_order, near_radius,
                   loss_radius, short_radius) for _, ks in sorted(groups.items())]


def _stack(frames, rows, weights, index, K, near_radius, loss_radius, short_radius) -> FrameSet:
    per = []
    for s in frames:
        qm, mm = s.qm_indices, s.mm_indices
        origin = s.positions[qm[0]]
        links = s.links
        qm_pos = torch.as_tensor(s.positions[qm] - origin)
        all_pos = torch.as_tensor(np.concatenate([s.positions[qm], link_positions(s.positions, links, s.link_g)])
                                  - origin)
        mm_pos = torch.as_tensor(s.positions[mm] - origin)
        charge = torch.as_tensor(s.mm_charge[mm])
        d = torch.cdist(all_pos, mm_pos).amin(dim=0) if len(mm) else torch.zeros(0, dtype=torch.float64)
        near = d < near_radius
        far = taylor_tensors(all_pos[None], mm_pos[~near][None], charge[~near][None], K + 1)[0]
        order = torch.nonzero(near).flatten()
        order = order[torch.argsort(d[order], stable=True)]  # nearest first: the short-range atoms lead
        slot = {int(mm[k]): j for j, k in enumerate(order)}   # atom index -> near index
        per.append(dict(
            species=torch.as_tensor([index[x] for x in s.qm_symbols] + [index["H"]] * len(links)), qm=qm_pos,
            far=far, link_q1=torch.as_tensor(np.searchsorted(qm, links[:, 0]), dtype=torch.long),
            link_m1=torch.as_tensor([slot[int(m1)] for m1 in links[:, 1]], dtype=torch.long),
            link_g=torch.as_tensor(s.link_g),
            near_pos=mm_pos[order], near_charge=charge[order], near_scored=d[order] < loss_radius,
            n_short=int((d[order] < short_radius).sum()), total_charge=float(s.qm_total_charge),
            energy=s.energy, qm_forces=None if s.forces is None else torch.as_tensor(s.forces[qm]),
            near_forces=None if s.forces is None else torch.as_tensor(s.forces[mm])[order],
            qm_charges=None if s.qm_charges is None else torch.as_tensor(s.qm_charges[qm]),
            dipole=None if s.dipole is None else torch.as_tensor(s.dipole)))
    m = max(max(len(p["near_charge"]) for p in per), 1)

    def pad(t, fill):
        return torch.cat([t, t.new_full((m - t.shape[0],) + tuple(t.shape[1:]), fill)])

    def stacked(key, fill=None):
        values = [p[key] for p in per]
        if any(v is None for v in values):
            return None
        return torch.stack([pad(v, fill) if fill is not None else torch.as_tensor(v) for v in values])

    far_away = torch.tensor([PADDING_DISTANCE, 0.0, 0.0], dtype=torch.float64)
    near_pos = torch.stack([torch.cat([p["near_pos"], far_away.expand(m - len(p["near_pos"]), 3)]) for p in per])
    return FrameSet(
        index=torch.as_tensor(rows), species=stacked("species"), qm=stacked("qm"), far=stacked("far"),
        link_q1=stacked("link_q1"), link_m1=stacked("link_m1"), link_g=stacked("link_g"),
        near_pos=near_pos, near_charge=stacked("near_charge", 0.0), near_scored=stacked("near_scored", False),
        n_short=max(max(p["n_short"] for p in per), 1),
        total_charge=torch.as_tensor([p["total_charge"] for p in per], dtype=torch.float64),
        weight=torch.as_tensor(weights, dtype=torch.float64),
        energy=None if any(p["energy"] is None for p in per) else torch.as_tensor([p["energy"] for p in per]),
        qm_forces=stacked("qm_forces"), near_forces=stacked("near_forces", 0.0),
        qm_charges=stacked("qm_charges"), dipole=stacked("dipole"))


def batches(sets: list[FrameSet], rows_of: list[torch.Tensor], size: int, rng: np.random.Generator | None = None,
            device=None):
    """Batches of at most ``size`` frames, each from one set; shuffled (across sets too) when ``rng`` is given."""
    chunks = []
    for k, rows in enumerate(rows_of):
        order = rows[torch.as_tensor(rng.permutation(len(rows)))] if rng is not None else rows
        chunks += [(k, order[i:i + size]) for i in range(0, len(order), size)]
    if rng is not None:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    for k, rows in chunks:
        yield sets[k].select(rows, device)


def rows_in(sets: list[FrameSet], frames: list[int]) -> list[torch.Tensor]:
    """For each set, the rows holding the frames ``frames`` (indices into the original list)."""
    wanted = torch.as_tensor(sorted(frames), dtype=torch.long)
    return [torch.nonzero(torch.isin(s.index, wanted)).flatten() for s in sets]


def split_frames(split_file: str | Path, subset: str, data: list[str | Path]) -> list[list[QMMMStructure]]:
    """The ``subset`` frames of a training run's ``split.json``, file by file (one list per file of ``data``).

    ``data`` are the run's labelled files in the order of its config: the split numbers their frames one file
    after the other, and records the files' names, so that a different number of files is refused.
    """
    split_file = Path(split_file)
    try:
        split = json.loads(split_file.read_text())
        wanted = set(split[subset])
    except OSError as err:
        raise InputError(f"cannot read the split file {split_file}: {err}") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{split_file} is not a split.json of `qmmm-driver train` (no list '{subset}')") from None
    names = split.get("files")
    if names is not None and len(names) != len(data):
        raise InputError(f"{split_file} splits the frames of the files {', '.join(map(str, names))}, but {len(data)} "
                         f"were given: pass the training config's files, in its order")
    out, start = [], 0
    for path in data:
        frames = read_structures(path, require_labels=True)
        out.append([s for i, s in enumerate(frames, start) if i in wanted])
        start += len(frames)
    if wanted and max(wanted) >= start:
        raise InputError(f"{split_file} names frame {max(wanted)}, but the files hold {start} frames; pass the "
                         "same files, in the same order, as the training config")
    return out


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """Random train/validation/test split of ``n`` frames by frame, reproducible from ``seed``."""
    if n < 3:
        raise InputError(f"need at least 3 labelled frames to split into train/validation/test, got {n}")
    total = sum(fractions)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fractions[1] / total)))
    n_test = max(1, int(round(n * fractions[2] / total)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise InputError(f"split {fractions} leaves no training frame out of {n}")
    return {"train": sorted(perm[:n_train].tolist()), "validation": sorted(perm[n_train:n_train + n_val].tolist()),
            "test": sorted(perm[n_train + n_val:].tolist())}
