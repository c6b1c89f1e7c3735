"""The training domain of a model, and the check that says when a structure leaves it.

A model is only reliable for QM geometries like those it was trained on. Far
outside them its energy can turn over where the true one keeps rising (a bond
stretched beyond every training frame), and a path-integral bead or an umbrella
window that wanders there blows up some steps later. The domain recorded here is
simple and catches those cases: for every QM atom of element A and every element
B, the distance to the nearest other QM atom of element B (counted up to the
model's message-passing cutoff), and its smallest and largest value over the
training frames. A stretched O-H makes the H's nearest O farther than in any
frame; two stretched C-Cl bonds make the C's nearest Cl farther; a squeezed pair,
nearer.

The domain is stored in the model file's metadata (``statistics.domain``,
lengths in Bohr) by ``qmmm-driver train``; :class:`DomainCheck` reads it and
reports a structure outside it by more than :data:`TOLERANCE` (then again each
time the excursion grows by :data:`STEP`), naming the frame, the atoms and the
training range.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np

from .units import BOHR_TO_ANGSTROM

#: Excursions beyond the training range up to this many Bohr (0.05 A) are not reported.
TOLERANCE = 0.05 / BOHR_TO_ANGSTROM
#: After a report, the same kind of excursion is reported again only once it is this much (0.1 A) larger.
STEP = 0.1 / BOHR_TO_ANGSTROM


class ExtrapolationWarning(UserWarning):
    """A structure outside the model's training domain: its energy and forces there are not reliable."""


def exclusion(species: np.ndarray, n_elements: int) -> np.ndarray:
    """``[..., n, E, n]``: 0 where atom j is another atom than i and of element b, infinity elsewhere, for atoms
    ``species`` [..., n] (element indices): what :func:`nearest` adds to the distances before the minimum."""
    species = np.asarray(species)
    n = species.shape[-1]
    mine = (species[..., None, None, :] == np.arange(n_elements)[:, None]) & ~np.eye(n, dtype=bool)[:, None, :]
    return np.where(mine, 0.0, np.inf)


def nearest(pos: np.ndarray, excluded: np.ndarray, cutoff: float) -> np.ndarray:
    """``[B, n, E]``: the distance from each atom of frames ``pos`` [B, n, 3] to its nearest other atom of each
    element, at most ``cutoff`` (also where there is none); ``excluded`` from :func:`exclusion`."""
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    d2 = np.einsum("bijk,bijk->bij", diff, diff)
    return np.minimum(np.sqrt((d2[:, :, None, :] + excluded).min(axis=-1)), cutoff)


def nearest_by_element(pos: np.ndarray, species: np.ndarray, n_elements: int, cutoff: float) -> np.ndarray:
    """:func:`nearest` for frames ``pos`` [B, n, 3] of atoms ``species`` [n] or [B, n] (element indices)."""
    pos = np.asarray(pos, dtype=np.float64)
    return nearest(pos, exclusion(np.broadcast_to(np.asarray(species), pos.shape[:2]), n_elements), cutoff)


def fit_domain(frames: Iterable[tuple[np.ndarray, np.ndarray]], elements: list[str], cutoff: float) -> dict:
    """The domain of training ``frames`` (pairs of QM positions [B, n, 3] in Bohr and species [B, n]) as the
    model file stores it: ``{"cutoff": ..., "nearest": {"A-B": [smallest, largest]}}`` (Bohr), one entry per
    element pair that occurs."""
    E = len(elements)
    lo, hi = np.full((E, E), np.inf), np.full((E, E), -np.inf)
    for pos, species in frames:
        near = nearest_by_element(pos, species, E, cutoff)                                 # [B, n, E]
        species = np.broadcast_to(np.asarray(species), near.shape[:2])
        for a in range(E):
            of_a = near[species == a]                                                      # [k, E]
            if len(of_a):
                lo[a] = np.minimum(lo[a], of_a.min(axis=0))
                hi[a] = np.maximum(hi[a], of_a.max(axis=0))
    nearest = {f"{elements[a]}-{elements[b]}": [float(lo[a, b]), float(hi[a, b])]
               for a in range(E) for b in range(E) if lo[a, b] < cutoff}
    return {"cutoff": float(cutoff), "nearest": nearest}


def _report(text: str) -> None:
    warnings.warn(text, ExtrapolationWarning, stacklevel=3)


class DomainCheck:
    """Checks frames of one QM region (``species`` [n], element indices into ``elements``; ``names`` [n] how to
    call each atom in a message) against a stored domain, and reports excursions through ``report``."""

    def __init__(self, domain: dict, elements: list[str], species: np.ndarray, names: list[str],
                 report: Callable[[str], None] = _report):
        self.cutoff = float(domain["cutoff"])
        self.elements, self.names, self.report = list(elements), list(names), report
        self.species = np.asarray(species)
        E = len(self.elements)
        lo, hi = np.full((E, E), -np.inf), np.full((E, E), np.inf)  # no data for a pair: never reported
        for key, (small, large) in domain["nearest"].items():
            a, b = (self.elements.index(x) for x in key.split("-"))
            lo[a, b], hi[a, b] = small, large
        self.lo, self.hi = lo[self.species], hi[self.species]                              # [n, E]
        self.excluded = exclusion(self.species, E)
        self.reported: dict[tuple[int, int, str], float] = {}
        self.largest = 0.0  # the largest excursion seen (Bohr)

    @classmethod
    def of_model(cls, model, species: np.ndarray, names: list[str], **kwargs) -> "DomainCheck | None":
        """The check of a loaded model's stored domain (None for a model file without one)."""
        domain = getattr(model, "metadata", {}).get("statistics", {}).get("domain")
        return None if not domain else cls(domain, model.elements, species, names, **kwargs)

    def check(self, pos: np.ndarray) -> float:
        """Report the worst excursion of frames ``pos`` [B, n, 3] (Bohr) if it is new or has grown; returns the
        largest excursion (Bohr, 0 inside the domain)."""
        near = nearest(pos, self.excluded, self.cutoff)
        excess = np.maximum(near - self.hi, self.lo - near)                                # [B, n, E]
        worst = float(excess.max(initial=0.0))
        self.largest = max(self.largest, worst)
        if worst <= TOLERANCE:
            return worst
        f, i, b = np.unravel_index(int(np.argmax(excess)), excess.shape)
        side = "far" if near[f, i, b] > self.hi[i, b] else "near"
        key = (int(self.species[i]), int(b), side)
        if worst > self.reported.get(key, TOLERANCE - STEP) + STEP:
            self.reported[key] = worst
            a_name, b_name = self.elements[self.species[i]], self.elements[b]
            self.report(
                f"the model is extrapolating: in frame {f}, {self.names[i]} ({a_name}) has its nearest QM "
                f"{b_name} at {near[f, i, b] * BOHR_TO_ANGSTROM:.2f} A, but the training frames had "
                f"{self.lo[i, b] * BOHR_TO_ANGSTROM:.2f}-{self.hi[i, b] * BOHR_TO_ANGSTROM:.2f} A: energies and "
                f"forces there are not reliable (train on frames that cover it; README, 'Training domain')")
        return worst
