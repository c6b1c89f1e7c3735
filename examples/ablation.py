"""Ablations: what each piece of model physics, and each order K of the MM potential expansion, does.

Trains variants of the example's model with everything else equal (data, split, seed, architecture, number of
epochs) and scores each, with `qmmm-driver train`'s own final evaluation, on the in-distribution test split and
on the example's transfer sets (ions and a medium training never saw).

- ``physics``: the original model (features see the absolute MM potential), + exact gauge invariance,
  + short-range MM features, + atomic polarisabilities (the shipped architecture), + charge penetration
  (Gaussian QM charges in the baseline, 0.4 A).
- ``order``: K = 0 (potential), 1 (+ field), 2 (+ field gradient), 3 (+ third derivative), gauge invariant,
  with short-range features, without polarisabilities (they need the field, K >= 1).

    python examples/ablation.py water physics --epochs 40
    python examples/ablation.py sn2 order --epochs 40
    python examples/ablation.py water physics --report-only      # the table from finished runs

Writes runs/ablation-SYSTEM-KIND-VARIANT/ and examples/SYSTEM/ablation-KIND.json, and prints a Markdown table
(energy MAE in meV per frame with the mean signed error in brackets, QM-force MAE in meV/A).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PHYSICS = {
    "original": {"gauge_invariant": False, "short_range": False, "polarizability": False},
    "+gauge": {"gauge_invariant": True, "short_range": False, "polarizability": False},
    "+short-range": {"gauge_invariant": True, "short_range": True, "polarizability": False},
    "+polarizability": {"gauge_invariant": True, "short_range": True, "polarizability": True},
    "+penetration": {"gauge_invariant": True, "short_range": True, "polarizability": True,
                     "penetration_width": 0.4},
}
ORDER = {f"K={k}": {"env_order": k, "gauge_invariant": True, "short_range": True, "polarizability": False}
         for k in range(4)}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(cfg: dict, path: Path) -> None:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def fmt(metrics: dict) -> list[str]:
    e, s, f = (metrics.get(k) for k in ("energy_mae_meV", "energy_mean_signed_meV", "force_mae_meV_per_A"))
    return [f"{e:.1f} ({s:+.1f})" if e is not None else "-", f"{f:.0f}" if f is not None else "-"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=["water", "sn2"])
    p.add_argument("kind", choices=["physics", "order"])
    p.add_argument("--epochs", type=int, default=40, help="the common budget (default 40)")
    p.add_argument("--only", default=None, help="comma-separated variants to (re)run")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    example = REPO / "examples" / args.system
    base = tomllib.loads((example / "train.toml").read_text())
    variants = PHYSICS if args.kind == "physics" else ORDER
    rows = []
    for name, overrides in variants.items():
        run = REPO / "runs" / f"ablation-{args.system}-{args.kind}-{name.strip('+').replace('=', '')}"
        if not args.report_only and (args.only is None or name in args.only.split(",")):
            run.mkdir(parents=True, exist_ok=True)
            cfg = {s: dict(v) for s, v in base.items()}
            cfg.pop("stage2", None)
            for key in ("files", "transfer"):
                cfg["data"][key] = [str(example / f) for f in cfg["data"].get(key, [])]
            cfg["model"].update(overrides)
            cfg["training"].update(output=str(run), epochs=args.epochs, max_minutes=10000.0, patience=10000)
            write_config(cfg, run / "config.toml")
            subprocess.run([sys.executable, "-m", "qmmm_driver.cli", "train", str(run / "config.toml")], check=True)
        if (run / "test_metrics.json").exists():
            rows.append({"variant": name, "model": overrides, **json.loads((run / "test_metrics.json").read_text())})
    (example / f"ablation-{args.kind}.json").write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=1))
    sets = sorted({name for r in rows for name in r["transfer"]})
    short = [Path(s).name.split(".")[0].removeprefix(f"{args.system}_") for s in sets]
    print(f"\n{args.system}, {args.kind} ablation, {args.epochs} epochs each: energy MAE meV (mean signed), "
          "QM-force MAE meV/A")
    print("| variant | test E | test F | " + " | ".join(f"{s} E | {s} F" for s in short) + " |")
    print("|---" * (3 + 2 * len(sets)) + "|")
    for r in rows:
        cells = fmt(r) + [c for s in sets for c in fmt(r["transfer"].get(s, {}))]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
