"""Two-digit one-shot verification on numbers never seen in training (issue 19, part A).

Given ONE image of a number 00..99, does an unlabelled image show the same number? For each
seed: a new split of the 100 numbers (TEST_NUMBERS held out), new weights' init and new
training episodes; TEST_PAIRS test pairs of held-out numbers, built from the source's test
pool only, half same-number (task_streams/two_digit.py has the splits and their guards).
Three models (learners/learn_to_learn.py), each trained for its STEPS:

- ``weights``: a learner network writes a predictor's weights from the one example;
- ``similarity``: the baseline, the same encoder and a cosine similarity, no weight generation;
- ``digits``: the reference, a per-digit classifier trained with the digit labels of the
  training pool, "same" when the predicted numbers are equal.

Training is a learners.meta.Phase run by run_phase: trained weights are cached in CACHE by a
key of the settings, the number split and the code (a re-run only evaluates; --no-cache
recomputes), and a killed run resumes from its partial state.

    python benchmarks/learn_to_learn.py --write   # full (5 seeds, ~20 minutes on 2 CPU cores)
    python benchmarks/learn_to_learn.py --quick   # 2 seeds, short training (< 2 minutes)
    python benchmarks/learn_to_learn.py --device cuda   # the same run on a GPU, with its time

Ends with `name: value` lines (accuracy in [0, 1], mean over seeds, and its 95% t-interval
half-width); --write puts the table in docs/learn_to_learn.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------- settings
SEEDS = [0, 1, 2, 3, 4]
WORKERS = 2  # jobs at a time, one torch thread each
SOURCE = "mnist5k"  # 400 training and 100 test images per digit
TEST_NUMBERS = 20  # of the 100 numbers, held out
TEST_PAIRS = 2000
STEPS = {"weights": 2000, "similarity": 2000, "digits": 3000}
SETTINGS = {"episodes": 16, "queries": 8, "hard": 0.5, "digit_batch": 128, "shift": 2,
            "channels": 32, "embed": 64, "hidden": 32, "halves": True, "lr": 1e-3}  # fmt: skip
SOURCE_REPORTED = 0.88  # the source's figure, without these splits: a floor
TARGET = 0.95
CACHE = ROOT / ".lia-cache" / "learn_to_learn"
QUICK = {"SEEDS": [0, 1], "STEPS": {"weights": 120, "similarity": 120, "digits": 200},
         "TEST_PAIRS": 500}  # fmt: skip
CODE_FILES = ["learners/learn_to_learn.py", "learners/meta.py", "task_streams/two_digit.py",
              "task_streams/sources.py"]  # fmt: skip
# ------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def code_version() -> str:
    """Hash of the files a trained model depends on: a code fix invalidates the cache."""
    from orchestrator.identity import file_hash

    return "".join(file_hash(ROOT / name) for name in CODE_FILES)


def job(model: str, seed: int, steps: int, test_pairs: int, cache: str | None, device: str):
    """Train (or fetch) one model for one seed; its accuracy on the held-out numbers."""
    from learners.hparams import build_dataclass
    from learners.learn_to_learn import VerificationConfig, VerificationTraining, evaluate
    from learners.meta import run_phase
    from task_streams.sources import load_source
    from task_streams.two_digit import build_two_digit

    data = build_two_digit(SOURCE, seed=seed, test_numbers=TEST_NUMBERS,
                           pairs_per_split={"train": 2, "test": test_pairs})  # fmt: skip
    assert not set(data.train_numbers) & set(data.test_numbers)
    cfg = build_dataclass(VerificationConfig, {**SETTINGS, "model": model, "steps": steps,
                                               "seed": seed})  # fmt: skip
    phase = VerificationTraining(cfg, load_source(SOURCE), data.train_numbers, device)
    done = [e for e in run_phase(phase, cache, code=code_version()) if e["event"] == "done"][-1]
    return {"model": model, "seed": seed, **evaluate(phase.model, data.test),
            "seconds": done["compute_seconds"], "cached": done["cached"]}  # fmt: skip


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width (the reports' :func:`orchestrator.results.ci95`)."""
    import numpy as np

    from orchestrator.results import ci95

    return statistics.fmean(values), ci95(np.asarray(values, dtype=float))


def paired_difference(table: dict) -> tuple[float, float]:
    """weights − similarity, seed by seed (same split, test pairs and episodes' seed)."""
    return interval(
        [
            w - s
            for w, s in zip(
                table["weights"]["per_seed"], table["similarity"]["per_seed"], strict=True
            )
        ]
    )


def main() -> int:
    global SEEDS, STEPS, TEST_PAIRS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, short training")
    parser.add_argument("--write", action="store_true", help="write docs/learn_to_learn.md")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--no-cache", action="store_true", help="train again, keep nothing")
    args = parser.parse_args()
    if args.quick:
        SEEDS, STEPS, TEST_PAIRS = QUICK["SEEDS"], QUICK["STEPS"], QUICK["TEST_PAIRS"]
    cache = None if args.no_cache else str(CACHE)
    workers = 1 if args.device != "cpu" else WORKERS
    started = time.time()
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        futures = [pool.submit(job, m, s, STEPS[m], TEST_PAIRS, cache, args.device)
                   for s in SEEDS for m in STEPS]  # fmt: skip
        results = []
        for future in futures:
            r = future.result()
            results.append(r)
            how = "cached" if r["cached"] else "trained"
            print(f"{r['model']} seed {r['seed']}: {how} ({r['seconds']:.0f} s of training), "
                  f"accuracy {r['accuracy']:.4f}", file=sys.stderr)  # fmt: skip
    table = {}
    for model in STEPS:
        runs = [r for r in results if r["model"] == model]
        table[model] = {
            k: interval([r[k] for r in runs])
            for k in ("accuracy", "same_accuracy", "different_accuracy", "seconds")
        }
        table[model]["per_seed"] = [r["accuracy"] for r in runs]
    wall = time.time() - started
    reference = table["digits"]["accuracy"][0]
    for model, row in table.items():
        print(f"accuracy.{model}: {row['accuracy'][0]:.4f}")
        print(f"interval95.{model}: {row['accuracy'][1]:.4f}")
        print(f"same_accuracy.{model}: {row['same_accuracy'][0]:.4f}")
        print(f"different_accuracy.{model}: {row['different_accuracy'][0]:.4f}")
        print(f"train_seconds.{model}: {row['seconds'][0]:.1f}")
    for model in ("weights", "similarity"):
        print(f"gap_to_reference.{model}: {table[model]['accuracy'][0] - reference:+.4f}")
    paired = paired_difference(table)
    print(f"weights_minus_similarity: {paired[0]:+.4f}")
    print(f"weights_minus_similarity_interval95: {paired[1]:.4f}")
    print(f"weights_meets_target: {table['weights']['accuracy'][0] >= TARGET}")
    print(f"device: {args.device}")
    print(f"wall_s: {wall:.0f}")
    if args.write:
        write_docs(table, paired, args.device, wall, sum(r["cached"] for r in results),
                   len(results))  # fmt: skip
    return 0


NAMES = {
    "weights": "`weights`: the learner writes the predictor's weights",
    "similarity": "`similarity`: same encoder, cosine similarity (baseline)",
    "digits": "`digits`: per-digit classifier, numbers compared (reference)",
}


def write_docs(
    table: dict, paired: tuple[float, float], device: str, wall: float, cached: int, jobs: int
) -> None:
    """docs/learn_to_learn.md: this run's table, below the marker (the text above it is kept)."""
    pct = lambda m, h: f"{100 * m:.1f} ± {100 * h:.1f}"  # noqa: E731
    rows = [
        f"| {NAMES[m]} | {STEPS[m]} | {pct(*r['accuracy'])} | {pct(*r['same_accuracy'])} | "
        f"{pct(*r['different_accuracy'])} | "
        + ", ".join(f"{100 * a:.1f}" for a in r["per_seed"])
        + f" | {r['seconds'][0]:.0f} |"
        for m, r in table.items()
    ]
    reference = table["digits"]["accuracy"][0]
    lines = [
        f"Written by `python benchmarks/learn_to_learn.py --write` on "
        f"{time.strftime('%Y-%m-%d')} in {wall:.0f} s, {cached} of {jobs} models fetched from "
        f"the cache (training times are those of their computation: {device}, one thread per "
        f"job, {WORKERS if device == 'cpu' else 1} jobs at a time). {len(SEEDS)} seeds; each seed "
        f"its own split of the 100 numbers ({TEST_NUMBERS} held out), weights' init and "
        f"training episodes; {TEST_PAIRS} test pairs per seed (half same-number) of held-out "
        f"numbers, from `{SOURCE}`'s test pool. Accuracy in %, mean ± 95% t-interval over the "
        "seeds.", "",
        "| model | steps | unseen numbers | same-number pairs | different-number pairs | "
        "per seed | training s |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        f"Target: ≥ {100 * TARGET:.0f}% on unseen numbers. Gap to the reference: weights "
        f"{100 * (table['weights']['accuracy'][0] - reference):+.1f} points, similarity "
        f"{100 * (table['similarity']['accuracy'][0] - reference):+.1f} points. Weights − "
        f"similarity, paired by seed: {pct(*paired)} points. The source "
        f"reported ~{100 * SOURCE_REPORTED:.0f}% without these splits (a floor).", "",
        f"Settings: {SETTINGS}.",
    ]  # fmt: skip
    path = ROOT / "docs" / "learn_to_learn.md"
    text = path.read_text() if path.exists() else ""
    marker = "<!-- benchmark table: written by benchmarks/learn_to_learn.py --write -->"
    head, _, _ = text.partition(marker)
    path.write_text(head + marker + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
