"""Hyperparameters of the multiscale QM/MM model, with their units.

User-facing files (training configs) give lengths in Angstrom; the settings
object holds them in Bohr, the internal unit, and the model file stores that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..embedding import DEFAULT_R_OFF_A, DEFAULT_R_ON_A
from ..units import ANGSTROM_TO_BOHR

#: Settings given in Angstrom in configs and stored in Bohr.
LENGTH_KEYS = ("cutoff", "lr_switch_on", "lr_switch_off", "mm_switch_on", "mm_switch_off")


@dataclass
class ModelSettings:
    """Architecture of :class:`qmmm_driver.model.QMMMModel` (lengths in Bohr).

    - ``elements``: QM elements the model knows, e.g. ``["H", "O"]``.
    - ``env_order`` (K): highest order of the MM potential expansion fed to the
      model (0 potential, 1 field, 2 field gradient, 3 third derivative).
    - ``channels``: feature channels; each carries one irrep of every degree
      l = 0..``lmax`` (natural parity: 0e, 1o, 2e, 3o).
    - ``n_layers``: interaction blocks; ``cutoff``: QM-QM message-passing radius;
      ``n_radial``/``radial_hidden``: Bessel basis size and radial MLP width.
    - ``long_range``: learned per-layer QM charges produce Taylor tensors at the
      other QM atoms, switched on smoothly between ``lr_switch_on`` and ``lr_switch_off``.
    - ``electrostatic_baseline``: add the explicit energy of the predicted charges
      and atomic dipoles in the MM potential (the paper's "reference model").
    - ``mm_switch_on``/``mm_switch_off``: the embedding switch the training frames
      were presented with; the driver uses the same for periodic cells.
    """

    elements: list[str] = field(default_factory=list)
    env_order: int = 3
    channels: int = 32
    lmax: int = 3
    n_layers: int = 3
    cutoff: float = 5.0 * ANGSTROM_TO_BOHR
    n_radial: int = 8
    radial_hidden: int = 32
    readout_hidden: int = 32
    long_range: bool = True
    lr_switch_on: float = 3.0 * ANGSTROM_TO_BOHR
    lr_switch_off: float = 5.0 * ANGSTROM_TO_BOHR
    electrostatic_baseline: bool = True
    mm_switch_on: float = DEFAULT_R_ON_A * ANGSTROM_TO_BOHR
    mm_switch_off: float = DEFAULT_R_OFF_A * ANGSTROM_TO_BOHR

    def __post_init__(self):
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
        if not 0 < self.mm_switch_on < self.mm_switch_off:
            raise ValueError("MM switch needs 0 < mm_switch_on < mm_switch_off")

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
                    data[key] = float(data[key]) * ANGSTROM_TO_BOHR
        return cls(**data)
