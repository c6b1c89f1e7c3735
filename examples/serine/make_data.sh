#!/usr/bin/env bash
# The serine example's data: ACE-SER-NME in flexible TIP3P (ff14SB), QM = the side chain (atoms 12-16: CB, HB2,
# HB3, OG, HG), the CA-CB bond cut (link hydrogen, redistributed charges). OpenMM sampling, then PySCF labels
# (B3LYP/6-31+G*), one core each; about 2 hours on one core. Run from the repository root.
set -euo pipefail
out=${1:-runs/serine-data}
mkdir -p "$out"
sample() {
  qmmm-driver sample --solute examples/serine/dipeptide.pdb --solute-forcefield amber14-all.xml --qm 12-16 \
    --interval 0.5 --threads 1 "$@"
}
# an independent trajectory, never trained on; its equilibrated start is the i-PI start (system.pdb/.extxyz)
sample --frames 40 --seed 43 --out "$out/ser_test.extxyz" --system-dir "$out/system"
sample --frames 80 --seed 41 --out "$out/ser_water_a.extxyz"
sample --frames 40 --seed 44 --charge-noise 0.15 --out "$out/ser_noise.extxyz"   # field augmentation
sample --frames 60 --seed 45 --qm-noise 0.1 --out "$out/ser_stretch.extxyz"      # stretched bonds
sample --frames 90 --seed 46 --qm-noise 0.15 --out "$out/ser_stretch2.extxyz"
for name in ser_test ser_water_a ser_noise ser_stretch ser_stretch2; do
  qmmm-driver label "$out/$name.extxyz" --out "$out/${name}_labelled.extxyz" --threads 1
  xz -T1 -c "$out/${name}_labelled.extxyz" > "examples/serine/data/$name.extxyz.xz"
done
# the hydroxyl H pushed along its hydrogen bond (the first ML/MM run moved it onto a water without these)
python examples/serine/hydroxyl_frames.py "$out/ser_water_a_labelled.extxyz" "$out/ser_hbond.extxyz" --count 40
qmmm-driver label "$out/ser_hbond.extxyz" --out "$out/ser_hbond_labelled.extxyz" --threads 1
xz -T1 -c "$out/ser_hbond_labelled.extxyz" > examples/serine/data/ser_hbond.extxyz.xz
cp "$out/system/system.pdb" "$out/system/system.extxyz" examples/serine/
