"""The LSTM meta-learner against its controls: does it learn from feedback, with frozen weights?

Everything in process (the learners API: no Ray, no MLflow), one CPU thread per job, WORKERS
jobs at a time, SEEDS independent meta-trainings per condition (each seed its own weights'
init, episodes and evaluation episodes), 95% t-intervals over the seeds.

1. **Sine regression** (MAML's ranges): MSE on a *new* input after k = 0, 1, 2, 4, 9, 19
   feedbacks of the same function, on held-out functions. Rows:
   - ``lstm``: meta-trained with feedback, feedback given at test;
   - ``lstm, feedback withheld`` / ``lstm, feedback shuffled``: the same weights, the feedback
     zeroed, or attached to the wrong samples of the episode;
   - ``lstm trained without feedback``: the same LSTM meta-trained with feedback withheld;
   - ``sgd``: an MLP pretrained on the family (it learns the average function), then fine-tuned
     by SGD on the k points seen (SGD_STEPS steps, SGD_LR) — a learner that updates weights;
   - ``oracle``: the Bayes posterior mean in the family's basis (the floor).
2. **5-way random-label digits** (Santoro et al. 2016's protocol on the sklearn 8x8 digits,
   not Omniglot: 10 classes, so a held-out task reuses classes in new combinations and with
   new images): accuracy at the 1st, 2nd, 3rd, 4th, 5th and 10th presentation of a class,
   beside Santoro et al.'s LSTM and MANN rows; the same controls, and an SGD softmax classifier
   trained from scratch on the samples seen so far.
3. **Continual, no state reset**: held-out episodes A, B, A' (A' = task A again, new images of
   the same classes with the same labels), switched without announcement, given to the
   digits model (meta-trained on one-task episodes unless DIGITS["segments"] > 1): accuracy
   after a switch (recovery) and on A's return (in-context forgetting).
4. **Meta-training time** per model and where it goes (sampling episodes / the LSTM's forward,
   backward and step), on this machine's CPU and, with --device cuda, on a GPU.

    python benchmarks/meta_learning.py --write   # full (SEEDS, ~45 minutes here)
    python benchmarks/meta_learning.py --quick   # 2 seeds, short meta-training (< 2 minutes)

Ends with `name: value` lines; --write puts the tables in docs/meta_learning.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ---------------------------------------------------------------- settings
SEEDS = [0, 1, 2, 3, 4]
WORKERS = 2
K_FEEDBACKS = [0, 1, 2, 4, 9, 19]
PRESENTATIONS = [0, 1, 2, 3, 4, 9]  # 1st, 2nd, 3rd, 4th, 5th, 10th
EVAL_EPISODES = 200
SINE = {"hidden": 64, "steps": 6000, "batch": 16, "length": 20, "lr": 3e-3, "truncation": 20}
DIGITS = {"hidden": 128, "steps": 30000, "batch": 16, "length": 50, "lr": 2e-3,
          "truncation": 50, "ways": 5, "source": "digits", "segments": 1}  # fmt: skip
SGD_STEPS, SGD_LR = 10, 0.01
SGD_PRETRAIN_STEPS = 2000
SANTORO = {  # Omniglot, 5-way, % at the 1st, 2nd, 3rd, 4th, 5th, 10th presentation
    "Santoro et al. LSTM": [24.4, 49.5, 55.3, 61.0, 63.6, 62.5],
    "Santoro et al. MANN": [36.4, 82.8, 91.0, 92.6, 94.9, 98.1],
}
QUICK = {"SEEDS": [0, 1], "SINE_STEPS": 150, "DIGITS_STEPS": 150, "EVAL_EPISODES": 40}
# ------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def meta_train(family, settings: dict, seed: int, mode: str, device: str = "cpu"):
    """A FeedbackLSTM meta-trained on ``family`` (feedback ``mode``); (model, timings)."""
    import torch

    from learners.lstm_meta import FeedbackLSTM, meta_step

    torch.manual_seed(seed)
    model = FeedbackLSTM(math.prod(family.input_shape), family.num_outputs,
                         settings["hidden"], 1, family.kind).to(device)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    generator = torch.Generator().manual_seed(1000 + seed)
    sampling = training = 0.0
    for _ in range(settings["steps"]):
        start = time.perf_counter()
        segments = settings.get("segments", 1)
        episodes = family.sample(settings["batch"], settings["length"], segments, generator,
                                 "meta").to(device)  # fmt: skip
        middle = time.perf_counter()
        meta_step(model, optimizer, episodes, 1, settings["truncation"], 1.0, mode)
        if device != "cpu":
            torch.cuda.synchronize()
        sampling += middle - start
        training += time.perf_counter() - middle
    return model, {"sampling_s": sampling, "training_s": training}


def _prequential_errors(model, episodes, mode: str):
    """Per-sample loss (regression: squared error) or correctness (classification)."""
    import torch

    from learners.lstm_meta import prequential

    model.eval()
    with torch.no_grad():
        out, _ = prequential(model, episodes, 1, mode)
    if model.kind == "regression":
        return (out - episodes.y).pow(2)
    return (out.argmax(-1) == episodes.y).float()


def _sgd_regression(family, episodes, seed: int):
    """MLP pretrained on the family, fine-tuned by SGD on the k points seen; error at k."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2000 + seed)
    for _ in range(SGD_PRETRAIN_STEPS):
        batch = family.sample(16, 20, 1, g, "meta")
        loss = (net(batch.x).squeeze(-1) - batch.y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pretrained = {k: v.clone() for k, v in net.state_dict().items()}
    errors = torch.zeros(episodes.batch, episodes.length)
    for k in K_FEEDBACKS:
        for b in range(episodes.batch):
            net.load_state_dict(pretrained)
            sgd = torch.optim.SGD(net.parameters(), lr=SGD_LR)
            if k > 0:
                for _ in range(SGD_STEPS):
                    loss = (net(episodes.x[b, :k]).squeeze(-1) - episodes.y[b, :k]).pow(2).mean()
                    sgd.zero_grad()
                    loss.backward()
                    sgd.step()
            with torch.no_grad():
                errors[b, k] = (net(episodes.x[b, k : k + 1]).squeeze() - episodes.y[b, k]) ** 2
    return errors


def _sgd_classification(family, episodes, seed: int):
    """Softmax regression trained from scratch by SGD on the samples seen so far (prequential,
    at the positions where a class is presented for the p-th time); correctness per sample."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x = episodes.x.reshape(episodes.batch, episodes.length, -1)
    correct = torch.full((episodes.batch, episodes.length), float("nan"))
    for b in range(episodes.batch):
        wanted = [t for t in range(episodes.length)
                  if int(episodes.presentation[b, t]) in PRESENTATIONS
                  and int(episodes.segment[b, t]) == 0]  # fmt: skip
        for t in wanted:
            w = torch.zeros(x.shape[-1], family.num_outputs, requires_grad=True)
            bias = torch.zeros(family.num_outputs, requires_grad=True)
            sgd = torch.optim.SGD([w, bias], lr=0.5)
            if t > 0:
                for _ in range(SGD_STEPS):
                    loss = F.cross_entropy(x[b, :t] @ w + bias, episodes.y[b, :t])
                    sgd.zero_grad()
                    loss.backward()
                    sgd.step()
            with torch.no_grad():
                correct[b, t] = float((x[b, t] @ w + bias).argmax() == episodes.y[b, t])
    return correct


def sine_job(seed: int, settings: dict, episodes_n: int) -> dict:
    """Every row of the sine table for one seed: MSE at each k."""
    import torch

    from task_streams.families import bayes_linear_predictions, build_family

    family = build_family("sine")
    held = family.sample(episodes_n, max(K_FEEDBACKS) + 1, 1,
                         torch.Generator().manual_seed(3000 + seed), "heldout")  # fmt: skip
    started = time.perf_counter()
    model, timing = meta_train(family, settings, seed, "given")
    seconds = time.perf_counter() - started
    control, _ = meta_train(family, settings, seed, "withheld")
    rows = {
        "lstm": _prequential_errors(model, held, "given"),
        "lstm, feedback withheld": _prequential_errors(model, held, "withheld"),
        "lstm, feedback shuffled": _prequential_errors(model, held, "shuffled"),
        "lstm trained without feedback": _prequential_errors(control, held, "withheld"),
        "sgd (pretrained MLP, fine-tuned)": _sgd_regression(family, held, seed),
        "oracle (Bayes, family basis)": (bayes_linear_predictions(family, held) - held.y).pow(2),
    }
    return {"study": "sine", "seed": seed, "seconds": seconds, **timing,
            "rows": {name: [float(e[:, k].mean()) for k in K_FEEDBACKS]
                     for name, e in rows.items()}}  # fmt: skip


def digits_job(seed: int, settings: dict, episodes_n: int) -> dict:
    """The digits table (accuracy per presentation) and the continual A, B, A' episodes."""
    import torch

    from task_streams.families import Episodes, build_family

    family = build_family("random_labels", source=settings["source"], ways=settings["ways"])
    g = torch.Generator().manual_seed(3000 + seed)
    held = family.sample(episodes_n, settings["length"], 1, g, "heldout")
    started = time.perf_counter()
    model, timing = meta_train(family, settings, seed, "given")
    seconds = time.perf_counter() - started
    control, _ = meta_train(family, settings, seed, "withheld")

    def by_presentation(correct):
        return [float(correct[held.presentation == p].nanmean()) * 100 for p in PRESENTATIONS]

    rows = {
        "lstm": by_presentation(_prequential_errors(model, held, "given")),
        "lstm, feedback withheld": by_presentation(_prequential_errors(model, held, "withheld")),
        "lstm, feedback shuffled": by_presentation(_prequential_errors(model, held, "shuffled")),
        "lstm trained without feedback": by_presentation(
            _prequential_errors(control, held, "withheld")
        ),
        "sgd (softmax, from scratch)": by_presentation(_sgd_classification(family, held, seed)),
    }
    # continual: A (first half of a long task), B, then A' (its second half: same mapping)
    n, length = episodes_n, settings["length"]
    a = family.sample(n, 2 * length, 1, g, "heldout")
    b = family.sample(n, length, 1, g, "heldout")
    x = torch.cat([a.x[:, :length], b.x, a.x[:, length:]], dim=1)
    y = torch.cat([a.y[:, :length], b.y, a.y[:, length:]], dim=1)
    segment = torch.cat([torch.zeros(n, length), torch.ones(n, length),
                         torch.full((n, length), 2.0)], dim=1).long()  # fmt: skip
    presentation = torch.cat([a.presentation[:, :length], b.presentation,
                              a.presentation[:, length:]], dim=1)  # fmt: skip
    continual = Episodes(x, y, segment, presentation, "classification")
    correct = _prequential_errors(model, continual, "given")
    window = 5  # samples
    curve = {
        "A, first 5 samples": correct[:, :window].mean(),
        "A, last 5 samples": correct[:, length - window : length].mean(),
        "B, first 5 samples (after the switch)": correct[:, length : length + window].mean(),
        "B, last 5 samples": correct[:, 2 * length - window : 2 * length].mean(),
        "A', first 5 samples (A returns)": correct[:, 2 * length : 2 * length + window].mean(),
        "A', last 5 samples": correct[:, -window:].mean(),
    }
    return {"study": "digits", "seed": seed, "seconds": seconds, **timing, "rows": rows,
            "continual": {k: float(v) * 100 for k, v in curve.items()}}  # fmt: skip


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (:func:`orchestrator.results.ci95`)."""
    import numpy as np

    from orchestrator.results import ci95

    return statistics.fmean(values), ci95(np.asarray(values, dtype=float))


def _cell(values: list[float], digits: int) -> str:
    mean, half = _interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def main() -> int:
    global SEEDS, EVAL_EPISODES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, short meta-training")
    parser.add_argument("--write", action="store_true", help="write docs/meta_learning.md")
    args = parser.parse_args()
    sine, digits = dict(SINE), dict(DIGITS)
    if args.quick:
        SEEDS, EVAL_EPISODES = QUICK["SEEDS"], QUICK["EVAL_EPISODES"]
        sine["steps"], digits["steps"] = QUICK["SINE_STEPS"], QUICK["DIGITS_STEPS"]
    started = time.time()
    with ProcessPoolExecutor(WORKERS, initializer=_init_worker) as pool:
        futures = [pool.submit(digits_job, s, digits, EVAL_EPISODES) for s in SEEDS]
        futures += [pool.submit(sine_job, s, sine, EVAL_EPISODES) for s in SEEDS]
        results = []
        for future in futures:
            r = future.result()
            results.append(r)
            print(f"{r['study']} seed {r['seed']}: meta-trained in {r['seconds']:.0f} s",
                  file=sys.stderr)  # fmt: skip
    lines = []
    tables = {}
    for study, columns, digits_shown in (("sine", K_FEEDBACKS, 3), ("digits", PRESENTATIONS, 1)):
        runs = [r for r in results if r["study"] == study]
        table = {}
        for name in runs[0]["rows"]:
            per_column = list(zip(*[r["rows"][name] for r in runs], strict=True))
            table[name] = [_cell(list(v), digits_shown) for v in per_column]
            for c, v in zip(columns, per_column, strict=True):
                key = name.split(" (")[0].replace(", ", "_").replace(" ", "_")
                lines.append(f"{study}.{key}.{c}: {statistics.fmean(v):.4f}")
        tables[study] = table
    runs = [r for r in results if r["study"] == "digits"]
    continual = {k: _cell([r["continual"][k] for r in runs], 1) for k in runs[0]["continual"]}
    for k in runs[0]["continual"]:
        key = k.split(",")[0].replace("'", "_return") + "." + k.split(", ")[1].replace(" ", "_")
        lines.append(f"continual.{key}: {statistics.fmean(r['continual'][k] for r in runs):.2f}")
    timing = {}
    for study in ("sine", "digits"):
        runs = [r for r in results if r["study"] == study]
        timing[study] = {k: statistics.fmean(r[k] for r in runs)
                         for k in ("seconds", "sampling_s", "training_s")}  # fmt: skip
        lines.append(f"meta_train_seconds.{study}: {timing[study]['seconds']:.1f}")
    for line in lines:
        print(line)
    print(f"wall_s: {time.time() - started:.0f}")
    if args.write:
        write_docs(tables, continual, timing, sine, digits, time.time() - started)
    return 0


def _episode_shape(settings: dict) -> str:
    segments = settings.get("segments", 1)
    if segments == 1:
        return f"one task of {settings['length']} samples"
    return f"{segments} tasks of {settings['length']} samples, switched unannounced"


def write_docs(tables, continual, timing, sine, digits, wall) -> None:
    """docs/meta_learning.md: the tables of this run."""
    head = lambda cols: ["| | " + " | ".join(cols) + " |",  # noqa: E731
                         "|---|" + "---|" * len(cols)]  # fmt: skip
    lines = [
        "# The LSTM meta-learner against its controls", "",
        f"Written by `python benchmarks/meta_learning.py --write` on {time.strftime('%Y-%m-%d')} "
        f"in {wall:.0f} s: {len(SEEDS)} seeds (each its own meta-training), mean ± 95% "
        f"t-interval over the seeds, {EVAL_EPISODES} held-out episodes per seed, one CPU "
        "thread per job.", "",
        "## Sine regression: MSE on a new input after k feedbacks", "",
        f"LSTM {sine['hidden']} units, {sine['steps']} meta-steps of {sine['batch']} episodes "
        f"({sine['length']} samples), Adam {sine['lr']}.", "",
        *head([f"k = {k}" for k in K_FEEDBACKS]),
        *[f"| {n} | " + " | ".join(v) + " |" for n, v in tables["sine"].items()], "",
        "## 5-way random-label digits: accuracy (%) at the n-th presentation of a class", "",
        f"LSTM {digits['hidden']} units, {digits['steps']} meta-steps of {digits['batch']} "
        f"episodes ({_episode_shape(digits)}), Adam {digits['lr']}; images: sklearn's 8x8 "
        "digits, not Omniglot (10 classes: held-out tasks are new combinations of classes, "
        "with new images).", "",
        *head(["1st", "2nd", "3rd", "4th", "5th", "10th"]),
        *[f"| {n} | " + " | ".join(v) + " |" for n, v in tables["digits"].items()],
        *[f"| {n} (Omniglot) | " + " | ".join(f"{x:.1f}" for x in v) + " |"
          for n, v in SANTORO.items()], "",
        "## Continual, no state reset: tasks A, B, then A again (accuracy %)", "",
        "| window | accuracy |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in continual.items()], "",
        "## Meta-training time (CPU, one thread; seconds per model)", "",
        "| family | total | sampling episodes | LSTM forward, backward, step |",
        "|---|---|---|---|",
        *[f"| {s} | {t['seconds']:.1f} | {t['sampling_s']:.1f} | {t['training_s']:.1f} |"
          for s, t in timing.items()],
    ]  # fmt: skip
    path = Path(__file__).resolve().parent.parent / "docs" / "meta_learning.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
