"""The studies of a sweep experiment, for ``lia report``: one section per study.

``lia report <config name>-sweep`` prints, before the per-configuration tables, what each
study tuned and how: its protocol (and what that means for the figures below), objective,
sampler, pruner, trials by state, the best values with their parameters, the Pareto front of
a two-objective study, and its best complete trials. Everything comes from the study's MLflow
parent run (its tags and its ``trials.csv`` / ``pareto_front.csv``), so the report needs no
access to the Optuna storage. Registered under the ``lia.report_sections`` entry point.
"""

from __future__ import annotations

import ast
import io
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

PROTOCOLS = {
    "full": "tuned and evaluated on the same stream: optimistic, as most papers do",
    "heldout": "tuned on a validation stream (other seeds, 80/20 split of the training pool); "
    "the best values were then run on the evaluation stream with fresh seeds",
    "first_tasks": "tuned on the stream's first {first_tasks} tasks only",
}
TOP_TRIALS = 5
"""complete trials listed per study, best first"""


def _csv(run: Any, name: str) -> pd.DataFrame | None:
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{name}")
    except Exception:  # not logged (no complete trial, one objective) or unreadable
        return None
    return pd.read_csv(io.StringIO(text))


def _latest_per_study(runs: list[Any]) -> list[Any]:
    """The newest parent run of each study (a resumed study has one per invocation)."""
    newest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        newest[run.data.tags["lia.study"]] = run
    return [newest[name] for name in sorted(newest)]


def _trials_table(frame: pd.DataFrame, objectives: list[str], directions: list[str]) -> str:
    values = [c for c in frame.columns if c == "value" or c.startswith("values_")]
    params = [c for c in frame.columns if c.startswith("params_")]
    complete = frame[frame["state"] == "COMPLETE"]
    if complete.empty or not values:
        return ""
    ascending = directions[0] == "minimize"
    top = complete.sort_values(values[0], ascending=ascending).head(TOP_TRIALS)
    table = top[["number", *values, *params]].rename(
        columns={
            "number": "trial",
            **dict(zip(values, objectives, strict=False)),
            **{p: p.removeprefix("params_") for p in params},
        }
    )
    return table.to_markdown(index=False, floatfmt=".6g")


def _tuned_section(parents: list[Any]) -> str | None:
    """An evaluation experiment (heldout protocol): which study chose which values."""
    if not parents:
        return None
    newest: dict[tuple[str, str], Any] = {}
    for run in sorted(parents, key=lambda r: r.info.start_time or 0):
        tags = run.data.tags
        newest[(tags["lia.tuned_by"], tags.get("tuned.label", "?"))] = run
    parts = ["## Tuned by lia sweep", ""]
    for (study, label), run in sorted(newest.items()):
        tags = run.data.tags
        protocol = tags.get("sweep.protocol", "?")
        values = ", ".join(
            f"{k.removeprefix('tuned.')}={v}"
            for k, v in sorted(tags.items())
            if k.startswith("tuned.") and k != "tuned.label"
        )
        parts.append(
            f"- `{label}`: {values} from study `{study}` ({tags.get('sweep.storage', '?')}); "
            f"**protocol: {protocol}** — {PROTOCOLS.get(protocol, '')}"
        )
    return "\n".join(parts) + "\n"


def study_section(client: MlflowClient, experiment_id: str) -> str | None:
    """Markdown describing every study of the experiment; None when it holds no study."""
    parents = client.search_runs(
        [experiment_id], "tags.`lia.kind` = 'invocation'", max_results=1000
    )
    studies = _latest_per_study([r for r in parents if "lia.study" in r.data.tags])
    tuned = [r for r in parents if "lia.tuned_by" in r.data.tags]
    if not studies:
        return _tuned_section(tuned)
    from sweeps.config import OBJECTIVES

    parts = ["## Studies (lia sweep)", ""]
    for run in studies:
        tags = run.data.tags
        protocol = tags.get("sweep.protocol", "?")
        meaning = PROTOCOLS.get(protocol, "").format(first_tasks=tags.get("sweep.first_tasks", "k"))
        objectives = [str(o) for o in ast.literal_eval(tags.get("sweep.objective", "['ACC']"))]
        directions = [OBJECTIVES.get(o, "maximize") for o in objectives]
        counts = {s: tags.get(f"trials.{s}", "?") for s in ("complete", "pruned", "failed")}
        orphaned = tags.get("trials.orphaned", "0")
        pruner = tags.get("sweep.pruner", "?")
        if pruner in ("median", "percentile"):
            pruner += f" from task {tags.get('sweep.prune_from_task', '?')}"
        goals = ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=True))
        best = {k.removeprefix("best."): v for k, v in tags.items() if k.startswith("best.")}
        best_values = best.pop("values", None)
        parts += [
            f"### Study `{tags['lia.study']}` ({tags.get('sweep.label', '?')})",
            "",
            f"- **protocol: {protocol}** — {meaning}",
            f"- objective: {goals} · sampler {tags.get('sweep.sampler', '?')} "
            f"(seed {tags.get('sweep.sampler_seed', '?')}) · pruner {pruner} · "
            f"{tags.get('sweep.seeds_per_trial', '?')} seed(s) per trial",
            f"- trials: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['failed']} failed, {orphaned} orphaned by a dead driver "
            f"(n_trials {tags.get('sweep.n_trials', '?')}); status {run.info.status}",
        ]
        if best_values is not None:
            params = ", ".join(f"{k}={v}" for k, v in sorted(best.items()))
            parts.append(f"- best {', '.join(objectives)} = {best_values} with {params}")
        else:
            parts.append("- no complete trial yet")
        pareto = _csv(run, "pareto_front.csv") if len(objectives) > 1 else None
        if pareto is not None and not pareto.empty:
            parts += ["", "Pareto front:", "", pareto.to_markdown(index=False, floatfmt=".6g")]
        trials = _csv(run, "trials.csv")
        if trials is not None:
            table = _trials_table(trials, objectives, directions)
            if table:
                parts += ["", f"Best complete trials (at most {TOP_TRIALS}):", "", table]
        parts.append("")
    parts.append(
        "Pruned trials' runs ended KILLED and failed trials' runs FAILED: the tables below "
        "hold finished runs only, one row per configuration tried."
    )
    return "\n".join(parts) + "\n"
