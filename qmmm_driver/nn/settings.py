"""Hyperparameters of :class:`~qmmm_driver.nn.model.QMMMModel` (atomic units: lengths in Bohr)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

#: Bohr per Angstrom, for the defaults below (the same value as qmmm_driver.units.ANGSTROM_TO_BOHR).
ANGSTROM = 1.8897261246257702

#: A Gaussian cloud of width w differs from a point charge by erfc(r/w) < 2e-8 beyond r = PENETRATION_RANGE w.
PENETRATION_RANGE = 4.0
#: The learned width of an element's cloud lies between 0 and this times ``penetration_width``.
PENETRATION_MAX_FACTOR = 2.0

#: Settings that add a term without weights: a model fine-tuned with one switched on starts from the same weights.
PARAMETER_FREE = ("qm_electrostatics", "qq_switch_on", "qq_switch_off")

#: Settings that configs give in Angstrom and the model keeps in Bohr.
LENGTH_KEYS = ("cutoff", "lr_switch_on", "lr_switch_off", "qq_switch_on", "qq_switch_off", "mm_switch_on",
               "mm_switch_off", "short_range_cutoff", "penetration_width")


@dataclass
class ModelSettings:
    """Architecture of the multiscale QM/MM model (lengths in Bohr).

    - ``elements`` and ``masses`` (Dalton): the QM elements the model knows.
    - ``env_order`` (K): highest order of the MM potential's Taylor expansion the
      features see (0 potential, 1 field, 2 field gradient, 3 third derivative).
    - ``channels``: multiplicity of every irrep ``0e, 1o, ... lmax`` of the node features.
    - ``n_layers``: interaction blocks; ``cutoff``: QM-QM message-passing radius;
      ``n_radial``/``radial_hidden``: Bessel basis size and radial MLP width.
    - ``long_range``: learned per-layer QM charges add their Taylor tensors at the
      other QM atoms, switched on between ``lr_switch_on`` and ``lr_switch_off``.
    - ``qm_electrostatics``: add the Coulomb energy of the predicted QM charges with one another,
      ``1/2 sum_(i != j) q_i q_j / r_ij``, switched on between ``qq_switch_on`` and ``qq_switch_off``
      (beyond the message cutoff, where the learned part sees pairs only through the long-range
      features): fragments of the QM region far apart (a free ion and a molecule) then interact
      as charges do, whatever their orientation. Parameter-free, so a model trained without it
      can be fine-tuned with it.
    - ``electrostatic_baseline``: add the energy of the predicted charges and atomic
      dipoles in the MM potential (the paper's "reference model").
    - ``gauge_invariant``: the features see the MM potential relative to its mean
      over the QM atoms and the energy gets exactly ``Q_QM`` times that mean, so
      that a uniform potential shift dV changes the energy by exactly ``Q_QM dV``.
      ``false`` only reproduces the original model for the ablation.
    - ``short_range``: MM charges within ``short_range_cutoff`` of a QM atom enter the
      features directly (charge-weighted radial functions times spherical harmonics),
      where the single-centre Taylor expansion converges slowly.
    - ``polarizability``: learned atomic polarisabilities alpha_i >= 0 add the
      induction energy ``-1/2 sum_i alpha_i |E_i|^2`` of the MM field ``E_i``.
    - ``penetration_width`` (0: off): in the electrostatic baseline and the induction energy, every QM atom is a
      Gaussian charge cloud of a learned width per element (up to twice this value) rather than a point, for
      the MM charges within ``short_range_cutoff``: the potential ``erf(r/w)/r`` and its field stay finite when
      an MM charge comes close (charge penetration), instead of the point-charge ``1/r`` that the learned part
      would have to cancel outside its training data.
    - ``mm_switch_on``/``mm_switch_off``: the embedding switch the training frames
      were presented with; the driver uses the same for periodic cells.
    """

    elements: list[str] = field(default_factory=list)
    masses: list[float] = field(default_factory=list)
    env_order: int = 3
    channels: int = 32
    lmax: int = 3
    n_layers: int = 3
    cutoff: float = 5.0 * ANGSTROM
    n_radial: int = 8
    radial_hidden: int = 32
    readout_hidden: int = 32
    long_range: bool = True
    lr_switch_on: float = 3.0 * ANGSTROM
    lr_switch_off: float = 5.0 * ANGSTROM
    qm_electrostatics: bool = False
    qq_switch_on: float = 5.5 * ANGSTROM
    qq_switch_off: float = 7.0 * ANGSTROM
    electrostatic_baseline: bool = True
    gauge_invariant: bool = True
    short_range: bool = True
    short_range_cutoff: float = 4.0 * ANGSTROM
    polarizability: bool = True
    penetration_width: float = 0.0
    mm_switch_on: float = 10.0 * ANGSTROM
    mm_switch_off: float = 12.0 * ANGSTROM

    def __post_init__(self):
        if len(self.masses) != len(self.elements):
            raise ValueError(f"give one mass per element: {len(self.elements)} elements, {len(self.masses)} masses")
        if not 0 <= self.env_order <= 3:
            raise ValueError(f"env_order (K) must be 0, 1, 2 or 3, got {self.env_order}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if not 1 <= self.lmax <= 3:
            raise ValueError(f"lmax (degree of node features) must be 1, 2 or 3, got {self.lmax}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not 0 < self.lr_switch_on < self.lr_switch_off:
            raise ValueError("long-range switch needs 0 < lr_switch_on < lr_switch_off")
        if not 0 < self.qq_switch_on < self.qq_switch_off:
            raise ValueError("QM-QM Coulomb switch needs 0 < qq_switch_on < qq_switch_off")
        if not 0 < self.mm_switch_on < self.mm_switch_off:
            raise ValueError("MM switch needs 0 < mm_switch_on < mm_switch_off")
        if not 0 < self.short_range_cutoff:
            raise ValueError("short_range_cutoff must be positive")
        if self.penetration_width < 0:
            raise ValueError(f"penetration_width must be >= 0 (0: point charges), got {self.penetration_width}")
        if self.penetration_width > 0:
            if not (self.short_range and self.electrostatic_baseline):
                raise ValueError("penetration_width needs short_range and electrostatic_baseline (it damps the "
                                 "baseline for the short-range MM charges)")
            if PENETRATION_MAX_FACTOR * self.penetration_width * PENETRATION_RANGE > self.short_range_cutoff:
                raise ValueError(f"penetration_width {self.penetration_width:.3f} bohr is too wide for "
                                 f"short_range_cutoff {self.short_range_cutoff:.3f} bohr: the clouds (up to "
                                 f"{PENETRATION_MAX_FACTOR:g} times the width) must decay within the cutoff "
                                 f"(width <= cutoff / {PENETRATION_MAX_FACTOR * PENETRATION_RANGE:g})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, lengths_in_angstrom: bool = False) -> "ModelSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model setting(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        if lengths_in_angstrom:
            for key in LENGTH_KEYS:
                if key in data:
                    data[key] = float(data[key]) * ANGSTROM
        return cls(**data)
