"""Training lowers the loss, resumes and round-trips through save/load; evaluate reports the expected numbers."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qmmm_driver.evaluator import ModelEvaluator
from qmmm_driver.nn.io import save_model
from qmmm_driver.structures import QMMMStructure, write_structures

from conftest import tiny_model, water_cluster


def teacher_frames(n=24, seed=0):
    """Cluster frames labelled by a fixed 'teacher' model: exact, noise-free labels."""
    teacher = tiny_model(seed=7).double()
    frames = []
    rng = np.random.default_rng(seed)
    for k in range(n):
        atoms = water_cluster(n_mm=6 + k % 5, seed=100 + k)
        atoms.positions[:3] += rng.normal(scale=0.04, size=(3, 3))
        f = QMMMStructure.from_atoms(atoms)
        res = ModelEvaluator(teacher, f, dtype=torch.float64).compute(f.positions)
        f.energy, f.forces = float(res.energy[0]), res.forces[0]
        f.qm_charges = np.zeros(len(f.numbers))
        f.qm_charges[f.qm_indices] = res.qm_charges[0]
        f.dipole = res.dipole[0]
        frames.append(f)
    return teacher, frames


#: the smallest model section of a training config (a few seconds per run)
TINY_MODEL = """[model]
channels = 4
lmax = 1
n_layers = 1
radial_hidden = 4
readout_hidden = 4
"""


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qmmm_driver.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_tiny_training_lowers_loss_and_round_trips(tmp_path):
    _, frames = teacher_frames(n=30)
    write_structures(tmp_path / "frames.extxyz", frames[:24])
    write_structures(tmp_path / "held_out.extxyz", frames[24:])
    (tmp_path / "cfg.toml").write_text("""
[data]
files = ["frames.extxyz"]
transfer = ["held_out.extxyz"]
split = [0.7, 0.15, 0.15]
[model]
channels = 8
lmax = 2
n_layers = 1
radial_hidden = 8
readout_hidden = 8
[training]
output = "run"
epochs = 6
batch_size = 4
lr = 0.03
threads = 1
""")
    res = run_cli("train", tmp_path / "cfg.toml")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    (run / "stdout.txt").write_text(res.stdout)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 6
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    assert (run / "learning_curve.png").stat().st_size > 5000
    test = json.loads((run / "test_metrics.json").read_text())
    # the saved model reproduces the reported test metrics
    res = run_cli("evaluate", "--model", run / "model.pt", "--data", tmp_path / "frames.extxyz",
                  "--split", run / "split.json", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads(res.stdout)
    assert again["n_frames"] == test["n_frames"] == len(json.loads((run / "split.json").read_text())["test"])
    assert again["energy_mae_meV"] == pytest.approx(test["energy_mae_meV"], rel=1e-6)
    assert again["force_mae_meV_per_A"] == pytest.approx(test["force_mae_meV_per_A"], rel=1e-6)
    assert again["energy_mean_signed_meV"] == pytest.approx(test["energy_mean_signed_meV"], rel=1e-6)
    # another set of files than the run's is refused, naming the split's own
    res = run_cli("evaluate", "--model", run / "model.pt", "--data", tmp_path / "frames.extxyz",
                  tmp_path / "held_out.extxyz", "--split", run / "split.json", "--json")
    assert res.returncode == 2 and "splits the frames of the files frames.extxyz, but 2 were given" in res.stderr
    # the transfer set is scored, never trained on
    held = test["transfer"]["held_out.extxyz"]
    assert held["n_frames"] == 6
    res = run_cli("evaluate", "--model", run / "model.pt", "--data", tmp_path / "held_out.extxyz", "--json")
    assert json.loads(res.stdout)["energy_mae_meV"] == pytest.approx(held["energy_mae_meV"], rel=1e-6)
    assert "transfer held_out.extxyz (6 frames)" in res_train_stdout(run)
    # the model file records the training frames' domain (qmmm_driver.domain): here, the O-H lengths
    from qmmm_driver.evaluator import load
    rows = json.loads((run / "split.json").read_text())["train"]
    oh = np.concatenate([np.linalg.norm(frames[k].positions[[1, 2]] - frames[k].positions[0], axis=1) for k in rows])
    domain = load(run / "model.pt").metadata["statistics"]["domain"]
    assert domain["nearest"]["H-O"] == pytest.approx([oh.min(), oh.max()])
    # resume continues the run instead of starting over
    res = run_cli("train", tmp_path / "cfg.toml", "--resume", "--epochs", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == list(range(8))


def res_train_stdout(run):
    return (run / "stdout.txt").read_text()


def test_evaluate_reports_known_errors(tmp_path):
    teacher, frames = teacher_frames(n=6)
    save_model(teacher, tmp_path / "teacher.pt")
    write_structures(tmp_path / "exact.extxyz", frames)
    hartree, ev_per_a = 27.211386024367243, 27.211386024367243 / 0.5291772105638411
    for f in frames:  # known label offsets: +5 meV, +20 meV/A on x of every QM atom, +0.01 e
        f.energy += 0.005 / hartree
        f.forces[f.qm_indices, 0] += 0.020 / ev_per_a
        f.qm_charges[f.qm_indices] += 0.01
    write_structures(tmp_path / "shifted.extxyz", frames)
    exact = json.loads(run_cli("evaluate", "--model", tmp_path / "teacher.pt", "--data", tmp_path / "exact.extxyz",
                               "--dtype", "float64", "--json").stdout)
    assert exact["n_frames"] == 6
    assert exact["energy_mae_meV"] < 1e-3 and exact["force_mae_meV_per_A"] < 1e-2 and exact["charge_mae_e"] < 1e-6
    res = run_cli("evaluate", "--model", tmp_path / "teacher.pt", "--data", tmp_path / "shifted.extxyz",
                  "--dtype", "float64", "--json", "--parity", tmp_path / "parity.png")
    shifted = json.loads(res.stdout)
    assert set(shifted) >= {"n_frames", "energy_mae_meV", "energy_rmse_meV", "force_mae_meV_per_A",
                            "mm_force_mae_meV_per_A", "charge_mae_e"}
    assert shifted["energy_mae_meV"] == pytest.approx(5.0, abs=1e-3)
    assert shifted["energy_rmse_meV"] == pytest.approx(5.0, abs=1e-3)
    assert shifted["energy_mean_signed_meV"] == pytest.approx(-5.0, abs=1e-3)  # the model lies 5 meV below
    assert shifted["force_mae_meV_per_A"] == pytest.approx(20.0 / 3.0, abs=1e-2)
    assert shifted["charge_mae_e"] == pytest.approx(0.01, abs=1e-6)
    assert shifted["mm_force_mae_meV_per_A"] < 1e-2
    assert (tmp_path / "parity.png").stat().st_size > 5000
    for f in frames:  # frames without reference charges: the metric is missing, and JSON says null
        f.qm_charges = None
    write_structures(tmp_path / "nocharges.extxyz", frames)
    res = run_cli("evaluate", "--model", tmp_path / "teacher.pt", "--data", tmp_path / "nocharges.extxyz", "--json")
    assert '"charge_mae_e": null' in res.stdout and "NaN" not in res.stdout


def test_bad_config_is_refused(tmp_path):
    (tmp_path / "cfg.toml").write_text('[data]\nfiles = ["x.extxyz"]\n[training]\nepochz = 3\n')
    res = run_cli("train", tmp_path / "cfg.toml")
    assert res.returncode == 2 and "unknown key(s) ['epochz']" in res.stderr
    (tmp_path / "cfg.toml").write_text('[data]\nfiles = ["missing.extxyz"]\n')
    res = run_cli("train", tmp_path / "cfg.toml")
    assert res.returncode == 2 and "missing.extxyz does not exist" in res.stderr


def test_stage2_switches_loss_weights_and_caps_lr(tmp_path):
    _, frames = teacher_frames(n=12)
    write_structures(tmp_path / "frames.extxyz", frames)
    (tmp_path / "cfg.toml").write_text("""
[data]
files = ["frames.extxyz"]
split = [0.6, 0.2, 0.2]
""" + TINY_MODEL + """[training]
output = "run"
epochs = 4
batch_size = 4
lr = 0.01
threads = 1
[stage2]
start_epoch = 2
lr = 0.002
energy = 1000.0
""")
    res = run_cli("train", tmp_path / "cfg.toml")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "epoch 2: stage 2" in res.stdout and "'energy': 1000.0" in res.stdout
    lrs = [h["lr"] for h in json.loads((tmp_path / "run" / "history.json").read_text())]
    assert lrs[:2] == [0.01, 0.01] and all(lr <= 0.002 for lr in lrs[2:])


def test_init_starts_from_a_model_file_and_refuses_other_settings(tmp_path):
    """Fine-tuning: ``[training] init`` starts from the file's weights and statistics, not a fresh model; a file
    trained with other settings is refused, naming the setting."""
    from qmmm_driver.errors import InputError
    from qmmm_driver.nn import QMMMModel
    from qmmm_driver.training.config import load_config
    from qmmm_driver.training.loop import Trainer

    _, frames = teacher_frames(n=12)
    write_structures(tmp_path / "frames.extxyz", frames)
    text = """
[data]
files = ["frames.extxyz"]
split = [0.6, 0.2, 0.2]
[model]
channels = {channels}
lmax = 1
n_layers = 1
radial_hidden = 4
readout_hidden = 4
[training]
output = "run"
epochs = 1
batch_size = 4
threads = 1
init = "start.pt"
"""
    (tmp_path / "cfg.toml").write_text(text.format(channels=4))
    cfg = load_config(tmp_path / "cfg.toml")
    torch.manual_seed(5)
    start = QMMMModel(cfg.settings(["H", "O"]))
    with torch.no_grad():
        start.energy_shift.copy_(torch.tensor([-0.3, -75.1], dtype=torch.float64))
        start.energy_scale.fill_(0.02)
    save_model(start, tmp_path / "start.pt", metadata={"statistics": {"energy_scale": 0.02}})
    trainer = Trainer(cfg, progress=False)
    for name, value in start.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name].double().cpu(), value.double()), name
    assert trainer.stats["init"].endswith("start.pt") and trainer.stats["energy_scale"] == 0.02
    (tmp_path / "cfg.toml").write_text(text.format(channels=6))
    with pytest.raises(InputError, match="channels: config 6, model 4"):
        Trainer(load_config(tmp_path / "cfg.toml"), progress=False)
    # more interaction blocks than the file: the file's model, deepened, predicting exactly what it predicts
    (tmp_path / "cfg.toml").write_text(text.format(channels=4).replace("n_layers = 1", "n_layers = 3"))
    deeper = Trainer(load_config(tmp_path / "cfg.toml"), progress=False).model
    assert len(deeper.blocks) == 3
    frame = frames[0]
    a = ModelEvaluator(start.double(), frame, dtype=torch.float64).compute(frame.positions)
    b = ModelEvaluator(deeper.double(), frame, dtype=torch.float64).compute(frame.positions)
    assert b.energy[0] == pytest.approx(a.energy[0], rel=1e-13) and np.allclose(b.forces, a.forces, atol=1e-12)
    # a term without weights switched on: the file's weights, the setting the config's
    switched_on = text.format(channels=4).replace("n_layers = 1", "n_layers = 1\nqm_electrostatics = true")
    (tmp_path / "cfg.toml").write_text(switched_on)
    switched = Trainer(load_config(tmp_path / "cfg.toml"), progress=False).model
    assert switched.settings.qm_electrostatics and not start.settings.qm_electrostatics
    for name, value in start.state_dict().items():
        assert torch.equal(switched.state_dict()[name].double().cpu(), value.double()), name


def test_keep_split_keeps_earlier_frames_where_they_were(tmp_path):
    """A fine-tuning run with new files keeps the earlier run's split for the earlier files, so that no frame the
    starting model trained on lands in the new test set; a split that does not fit the files is refused."""
    from qmmm_driver.errors import InputError
    from qmmm_driver.training.config import load_config
    from qmmm_driver.training.loop import Trainer

    _, frames = teacher_frames(n=20)
    write_structures(tmp_path / "old.extxyz", frames[:12])
    write_structures(tmp_path / "new.extxyz", frames[12:])
    old = {"files": ["old.extxyz"], "train": [0, 2, 3, 4, 5, 7, 8, 9, 11], "validation": [1, 10], "test": [6]}
    (tmp_path / "old_split.json").write_text(json.dumps(old))
    text = """
[data]
files = {files}
split = [0.5, 0.25, 0.25]
keep_split = "old_split.json"
""" + TINY_MODEL + """[training]
output = "run"
epochs = 1
threads = 1
"""
    (tmp_path / "cfg.toml").write_text(text.format(files='["old.extxyz", "new.extxyz"]'))
    split = Trainer(load_config(tmp_path / "cfg.toml"), progress=False).split
    for part in ("train", "validation", "test"):
        assert [i for i in split[part] if i < 12] == old[part]
    assert sorted(sum((split[p] for p in split), [])) == list(range(20))
    assert len([i for i in split["test"] if i >= 12]) == 2  # the new file is split with the fractions
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test"] == split["test"]
    (tmp_path / "cfg.toml").write_text(text.format(files='["new.extxyz", "old.extxyz"]'))
    with pytest.raises(InputError, match="must start with"):
        Trainer(load_config(tmp_path / "cfg.toml"), progress=False)


def test_frames_far_above_their_file_median_are_left_out(tmp_path):
    from qmmm_driver.training.config import load_config
    from qmmm_driver.training.loop import Trainer
    from qmmm_driver.units import HARTREE

    _, frames = teacher_frames(n=12)
    frames[4].energy += 3.0 / HARTREE   # 3 eV above the others: a badly strained frame
    write_structures(tmp_path / "frames.extxyz", frames)
    (tmp_path / "cfg.toml").write_text("""
[data]
files = ["frames.extxyz"]
split = [0.6, 0.2, 0.2]
max_energy_above_median = 2.0
""" + TINY_MODEL + """[training]
output = "run"
threads = 1
""")
    trainer = Trainer(load_config(tmp_path / "cfg.toml"), progress=False)
    assert len(trainer.structures) == 11
    assert all(abs(s.energy - frames[4].energy) > 1e-9 for s in trainer.structures)
    # split.json numbers frames as in the file (for evaluate --split): the left-out frame is in no part
    written = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(written["train"] + written["validation"] + written["test"]) == [i for i in range(12) if i != 4]
    assert [trainer.structures[p].energy for p in trainer.split["test"]] == \
        pytest.approx([frames[i].energy for i in written["test"]], abs=1e-9)
    (tmp_path / "cfg.toml").write_text((tmp_path / "cfg.toml").read_text().replace("= 2.0", "= 4.0"))
    assert len(Trainer(load_config(tmp_path / "cfg.toml"), progress=False).structures) == 12


def test_frame_weights_scale_each_frames_share_of_the_loss():
    from qmmm_driver.training.data import prepare
    from qmmm_driver.training.loss import loss_terms, predict

    model, frames = teacher_frames(n=3)
    for k, f in enumerate(frames):  # every label off by a different amount, so that each frame's error differs
        f.energy += 0.01 * (1 + k)
    radius = 6.0 * 1.8897
    args = (model.elements, model.K, radius, radius, model.settings.short_range_cutoff)
    (equal,), (weighted,) = prepare(frames, *args), prepare(frames, *args, weights=[1.0, 0.0, 3.0])
    assert torch.equal(equal.weight, torch.ones(3)) and torch.equal(weighted.weight, torch.tensor([1.0, 0.0, 3.0],
                                                                                                   dtype=torch.float64))
    pred = {k: v.detach() for k, v in predict(model.double(), equal, create_graph=False).items()}
    per_frame = [loss_terms({k: v[k_:k_ + 1] for k, v in pred.items()}, equal.select(torch.tensor([k_])))
                 for k_ in range(3)]
    for key in ("energy", "forces", "mm_forces", "charges", "dipole"):
        both = loss_terms(pred, weighted)[key]
        if key == "mm_forces":  # a mean over each frame's scored MM atoms: frames weigh by weight x count
            counts = [int(equal.near_scored[k].sum()) for k in range(3)]
            expect = (per_frame[0][key] * counts[0] + 3 * per_frame[2][key] * counts[2]) / (counts[0] + 3 * counts[2])
        else:
            expect = (per_frame[0][key] + 3 * per_frame[2][key]) / 4
        assert float(both) == pytest.approx(float(expect), rel=1e-9), key
    assert float(loss_terms(pred, equal)["energy"]) == pytest.approx(
        float(sum(p["energy"] for p in per_frame) / 3), rel=1e-9)


def test_weights_of_files_not_trained_on_are_refused(tmp_path):
    from qmmm_driver.training.config import load_config
    from qmmm_driver.errors import InputError

    (tmp_path / "cfg.toml").write_text('[data]\nfiles = ["a.extxyz"]\nweights = {"b.extxyz" = 0.5}\n')
    with pytest.raises(InputError, match="'b.extxyz' is not one of 'files'"):
        load_config(tmp_path / "cfg.toml")
    (tmp_path / "cfg.toml").write_text('[data]\nfiles = ["a.extxyz"]\nweights = {"a.extxyz" = -1}\n')
    with pytest.raises(InputError, match="must be a number >= 0"):
        load_config(tmp_path / "cfg.toml")


def test_a_stop_signal_leaves_history_and_a_resumable_checkpoint(tmp_path):
    """SIGTERM (a batch scheduler's stop) during training: exit status 143, the epochs run so far in history.json
    and the learning curve, no test metrics, no temporary files; --resume then carries on from the checkpoint."""
    import signal
    import time

    _, frames = teacher_frames(n=12)
    write_structures(tmp_path / "frames.extxyz", frames)
    (tmp_path / "cfg.toml").write_text(f"""
[data]
files = ["frames.extxyz"]
split = [0.7, 0.15, 0.15]
{TINY_MODEL}
[training]
output = "run"
epochs = 100000
batch_size = 4
threads = 1
""")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qmmm_driver.cli", "train", str(tmp_path / "cfg.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a few more epochs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    epochs = [h["epoch"] for h in json.loads((run / "history.json").read_text())]
    assert len(epochs) >= 1 and epochs == list(range(len(epochs)))
    assert (run / "learning_curve.png").stat().st_size > 5000
    assert not (run / "test_metrics.json").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "history.json", "learning_curve.png",
                                                      "model.pt", "split.json"]
    res = run_cli("train", tmp_path / "cfg.toml", "--resume", "--epochs", len(epochs) + 2)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = [h["epoch"] for h in json.loads((run / "history.json").read_text())]
    assert resumed == list(range(len(epochs) + 2))
