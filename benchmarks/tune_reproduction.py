"""Tune the reproduction's method settings with `lia sweep` (heldout protocol), and record them.

`benchmarks/reproduce.py` compares every method with published figures; the papers tuned their
settings per scenario, so the comparison should too. This script does it with the product's
own tuner: for each study of reproduce.py and each method with a setting the protocol leaves
free (a penalty's strength, a distillation weight, DER++'s alpha / beta, GEM's margin), one
Optuna study through `sweeps.driver.sweep` on the same stream, model and training as
reproduce.py, with:

- protocol ``heldout``: trials train and score on ``stream.evaluate_on=validation`` (a fixed
  stratified 80/20 split of the training pool) with seeds offset by 10,000, so the test
  images reproduce.py reports are never seen while tuning;
- TPE (sampler seed 0), N_TRIALS trials, one seed per trial, median pruning from task 1;
- the method's own search range from its hp(search=...) declaration (SPACES below names the
  keys; the protocol's fixed settings, such as memory sizes, the optimizer and the learning
  rate, are not tuned).

The best values go to TUNED_FILE (YAML, checked in), which reproduce.py reads. Methods not
listed keep reproduce.py's METHOD_SETTINGS (settings the protocol fixes, or paper values).
Split Fashion-MNIST uses the values tuned on split MNIST (same scenario).

    python benchmarks/tune_reproduction.py            # every study (~40 minutes here)
    python benchmarks/tune_reproduction.py --quick    # 2 trials, 1 method, 2 epochs (< 2 min)

Ends with `name: value` lines: each study's best values and validation ACC.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402  (the protocol: streams, models, training, fixed settings)

# ---------------------------------------------------------------- settings
N_TRIALS = 12
SPACES = {  # method -> its tuned keys (ranges: the method's hp(search=...))
    "ewc": ["ewc_lambda"],
    "online_ewc": ["ewc_lambda", "gamma"],
    "si": ["si_c"],
    "mas": ["mas_lambda"],
    "lwf": ["lwf_weight", "temperature"],
    "der": ["alpha", "beta"],
    "gem": ["margin"],
}
GEM_PROTOCOL_SPACES = {"ewc": {"ewc_lambda": {"type": "log", "low": 0.1, "high": 30.0}}}
TUNED_FILE = Path(__file__).resolve().parent / "tuned_settings.yaml"
QUICK = {"N_TRIALS": 2, "SPACES": {"ewc": ["ewc_lambda"]}, "SPLIT_EPOCHS": 2,
         "SCENARIOS": ("class",), "GEM_PROTOCOL_SPACES": {}}  # fmt: skip
# ------------------------------------------------------------------------


def _space(method: str, keys: list[str]) -> dict:
    from sweeps.space import default_space

    declared = default_space(method)
    space = {}
    for key in keys:
        d = declared[key]
        space[key] = {"type": d.kind, "low": d.low, "high": d.high}
    return space


def _sweep(name: str, stream: dict, methods: dict, spaces: dict, hidden, train, work: Path):
    """One `lia sweep` over ``methods`` (label -> fixed settings), one study per label."""
    from sweeps.config import load_sweep_config
    from sweeps.driver import sweep

    results = {}
    for label, fixed in methods.items():  # each label its own space: one sweep per label
        config = load_sweep_config(
            {
                "name": f"{name}-{label}",
                "methods": {label: fixed},
                "seeds": [0],
                "stream": stream,
                "model": {"hidden": list(hidden)},
                "train": train,
                "resources": {"cpus_per_run": 1},
                "ray": {"num_cpus": reproduce.WORKERS},
                "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
                "checkpoints": {"dir": str(work / "checkpoints")},
                "sweep": {
                    "n_trials": N_TRIALS,
                    "space": spaces[label],
                    "protocol": "heldout",
                    "sampler": "tpe",
                    "sampler_seed": 0,
                    "pruner": "median",
                    "storage": f"sqlite:///{work / 'optuna.db'}",
                },
            }
        )
        (study,) = sweep(config, progress=False)
        results[label] = study
    return results


def main() -> int:
    global N_TRIALS, SPACES, GEM_PROTOCOL_SPACES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 trials, one method, 2 epochs")
    args = parser.parse_args()
    scenarios, epochs = reproduce.SCENARIOS, reproduce.SPLIT_EPOCHS
    if args.quick:
        N_TRIALS, SPACES = QUICK["N_TRIALS"], QUICK["SPACES"]
        GEM_PROTOCOL_SPACES = QUICK["GEM_PROTOCOL_SPACES"]
        scenarios, epochs = QUICK["SCENARIOS"], QUICK["SPLIT_EPOCHS"]
    from learners import learner_class

    started = time.time()
    studies = []  # (key in TUNED_FILE, stream, label -> fixed settings, label -> space, ...)
    if GEM_PROTOCOL_SPACES:
        stream = {"name": "permuted", "source": "mnist5k", "num_tasks": reproduce.GEM_TASKS,
                  "train_per_task": 1000, "test_per_task": 500}  # fmt: skip
        fixed = {m: _fixed(reproduce.GEM_PROTOCOL_SETTINGS, m, s)
                 for m, s in GEM_PROTOCOL_SPACES.items()}  # fmt: skip
        studies.append(("gem", stream, fixed, GEM_PROTOCOL_SPACES, [100, 100], reproduce.SGD))
    for scenario in scenarios:
        stream = {"name": "split", "source": "mnist5k", "num_tasks": 5, "scenario": scenario}
        labels = [m for m in SPACES if scenario in learner_class(m).SCENARIOS]
        fixed = {m: _fixed(reproduce.METHOD_SETTINGS, m, SPACES[m]) for m in labels}
        spaces = {m: _space(m, SPACES[m]) for m in labels}
        train = {**reproduce.ADAM, "epochs": epochs}
        studies.append((f"split-{scenario}", stream, fixed, spaces, [400, 400], train))
    tuned: dict[str, dict[str, dict]] = {}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lia-tune-") as tmp:
        for key, stream, fixed, spaces, hidden, train in studies:
            found = _sweep(f"tune-{key}", stream, fixed, spaces, hidden, train, Path(tmp))
            tuned[key] = {m: r.best_params for m, r in found.items() if r.best_params}
            for m, r in found.items():
                value = "none" if r.best_values is None else f"{r.best_values[0]:.3f}"
                lines.append(f"{key}.{m}: {r.best_params} validation ACC {value}")
    seconds = time.time() - started
    header = (
        f"# Written by `python benchmarks/tune_reproduction.py{' --quick' if args.quick else ''}`"
        f" on {datetime.date.today()} in {seconds:.0f} s: lia sweep, protocol heldout (validation"
        f" split, seeds + 10,000), TPE seed 0, {N_TRIALS} trials per study, 1 seed per trial,"
        " median pruning. Read by benchmarks/reproduce.py.\n"
    )
    if not args.quick:
        TUNED_FILE.write_text(header + yaml.safe_dump(_plain(tuned), sort_keys=True))
        print(f"wrote {TUNED_FILE}", file=sys.stderr)
    for line in lines:
        print(line)
    print(f"tune_seconds: {seconds:.0f}")
    return 0


def _fixed(settings: dict, method: str, tuned_keys) -> dict:
    """The protocol's settings for ``method`` without the keys being tuned."""
    return {k: v for k, v in settings.get(method, {}).items() if k not in tuned_keys}


def _plain(value):
    """Python floats / ints (not numpy) with 4 significant digits, for a readable YAML file."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


if __name__ == "__main__":
    sys.exit(main())
