"""Record a model's training domain in its file, for a model trained before `qmmm-driver train` recorded it.

    python examples/record_domain.py examples/water qmmm_driver/models/water/model.pt

Reads EXAMPLE/split.json (written by `qmmm-driver train` for the run that made the model), takes the training
frames of its files, and stores their domain (qmmm_driver.domain) in the model file's metadata. The weights and
their checksum are unchanged, so a compiled package made from the model still matches it.
"""

import json
import sys
from pathlib import Path

import numpy as np

from qmmm_driver.boundary import link_positions
from qmmm_driver.domain import fit_domain
from qmmm_driver.evaluator import load, species_of
from qmmm_driver.nn.io import save_model
from qmmm_driver.structures import read_structures
from qmmm_driver.units import BOHR_TO_ANGSTROM


def training_frames(example: Path, model):
    """(QM positions [1, n + links, 3] in Bohr, species [n + links]) of every training frame of the split."""
    split = json.loads((example / "split.json").read_text())
    train, start = set(split["train"]), 0
    for name in split["files"]:
        frames = read_structures(example / name, require_labels=True)
        for k, frame in enumerate(frames):
            if start + k in train:
                qm = frame.positions[frame.qm_indices]
                links = link_positions(frame.positions, frame.links, frame.link_g)
                yield np.concatenate([qm, links])[None], np.array(species_of(model, frame))
        start += len(frames)


def main():
    example, path = Path(sys.argv[1]), Path(sys.argv[2])
    model = load(path)
    domain = fit_domain(training_frames(example, model), model.elements, model.settings.cutoff)
    metadata = dict(model.metadata)
    metadata["statistics"] = {**metadata.get("statistics", {}), "domain": domain}
    save_model(model, path, metadata=metadata)
    for key, (small, large) in sorted(domain["nearest"].items()):
        print(f"{key:6s} nearest {small * BOHR_TO_ANGSTROM:.3f}-{large * BOHR_TO_ANGSTROM:.3f} A")


if __name__ == "__main__":
    main()
