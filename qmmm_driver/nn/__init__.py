"""The equivariant multiscale QM/MM model: torch and e3nn only, nothing else from qmmm-driver.

- :mod:`.settings`: hyperparameters (:class:`ModelSettings`);
- :mod:`.multipoles`: Taylor tensors of the MM potential at the QM atoms;
- :mod:`.blocks`: radial basis, packed equivariant layers, the interaction block;
- :mod:`.model`: :class:`QMMMModel`;
- :mod:`.potential`: energy and gradients of a batch (:class:`Potential`), the unit run at every force call;
- :mod:`.compile`: ahead-of-time compilation of a :class:`Potential`;
- :mod:`.io`: the model file (checksummed, never unpickles code).
"""

from .model import QMMMModel
from .settings import ModelSettings

__all__ = ["QMMMModel", "ModelSettings"]
