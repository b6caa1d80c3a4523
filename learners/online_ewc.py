"""Online EWC (Schwarz et al., 2018, "Progress & Compress", Eq. 8; the "online EWC" of van de
Ven & Tolias, 2019, "Three scenarios for continual learning").

EWC keeps one (Fisher, anchor) pair per task, so its memory and per-step cost grow with the
stream. Online EWC keeps ONE running Fisher and ONE anchor: after each task t

    F ← γ·F + F_t,        θ* ← θ(end of task t)

and later tasks minimise L(θ) = CE(θ) + (λ / 2) · Σ_i F_i · (θ_i − θ*_i)².
γ ∈ [0, 1] forgets old tasks' Fisher geometrically (γ = 1: F = Σ_t F_t, the sum EWC uses, but
around the last anchor only; γ = 0: only the last task's Fisher).

Normalisation, on which the scale of λ (``ewc_lambda``) depends: this class IS EWC
(``learners/ewc.py``) holding a single (Fisher, anchor) pair instead of one per task. F_t is
estimated by EWC's own ``after_task`` (``fisher_samples`` drawn with the learner's generator,
``fisher_type``), so it is the MEAN over the Fisher samples of the squared per-sample gradient
of −log softmax(f_θ(x))_y, and the penalty, the way its gradient is applied and the saved
state are EWC's: λ has EWC's scale, and with γ = 1 after one task the penalty is EWC's
exactly. (Schwarz et al. write λ without the 1/2 and normalise F differently; their λ values
do not transfer.) Only ``after_task`` differs: it folds the new task's pair into the one kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from learners.base import register
from learners.ewc import EWC, EWCHParams
from learners.hparams import hp
from task_streams.base import Task


@dataclass
class OnlineEWCHParams(EWCHParams):
    """Hyperparameters of online EWC: EWC's (same λ scale, same Fisher), plus the decay γ."""

    ewc_lambda: float = hp(
        10.0,
        help="penalty strength λ in (λ/2)·Σ F·(θ−θ*)², F the decayed sum of the tasks' Fishers",
        low=0.0,
        search=(1e-1, 1e5),
        log=True,
    )
    gamma: float = hp(
        1.0,
        help="decay γ of the running Fisher, F ← γ·F + F_t (1 = plain sum over tasks)",
        low=0.0,
        high=1.0,
        search=(0.5, 1.0),
    )


@register("online_ewc")
class OnlineEWC(EWC):
    """EWC with one running Fisher, decayed by γ at each task, around the last task's weights."""

    HParams = OnlineEWCHParams

    def after_task(self, task: Task) -> None:
        """F ← γ·F + F_t (F_t from EWC's estimate); θ* ← the current weights."""
        previous = self.fishers[0] if self.fishers else None
        self.fishers, self.anchors = [], []
        super().after_task(task)  # estimates F_t and stores the pair (F_t, θ)
        if previous is not None:
            gamma = self.hparams.gamma
            self.fishers = [
                {n: gamma * previous.get(n, 0.0) + v for n, v in self.fishers[0].items()}
            ]
            self._consolidate()
