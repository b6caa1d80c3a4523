"""Task-conditioned hypernetwork (von Oswald, Henning, Sacramento & Grewe, ICLR 2020,
"Continual learning with hypernetworks", arXiv:1906.00695).

A hypernetwork h(e; φ) maps a learned task embedding e_t to ALL the weights of a target
network, an MLP shaped like the configured backbone (input → ``model.hidden`` → classes, ReLU,
``model.dropout`` after each hidden ReLU). Task t's answers come from the target net with
weights h(e_t; φ). Training on task t trains φ and e_t on

    L = CE(target net with weights h(e_t; φ)) + (β / |T_old|) · Σ_{t' ∈ T_old} ‖h(e_t'; φ) − h*_t'‖²

where T_old are the tasks learned before t and h*_t' = h(e_t'; φ) computed (detached) in
``before_task``: the paper's output regulariser, eq. 2 (β = ``beta``, 0.01 as in the paper).
Old embeddings are frozen; the regulariser only moves φ, and forgetting is kept low by keeping
the hypernetwork's output for each old embedding where it was.

Chunking (``chunk_size`` > 0, the paper's chunked hypernetwork): the weight vector is cut into
⌈n / chunk_size⌉ chunks; chunk k is h([e_t, c_k]; φ) with a learned chunk embedding c_k shared
by all tasks (part of φ), the concatenation cropped to the n target weights. With
``chunk_size`` = 0 the hypernetwork outputs all n weights at once (its output layer then has
n·width parameters: 22 million for a 784-100-100-10 target and the default last width 250).

Test time. Task-incremental (``scenario: task``): the given task id picks the embedding.
Domain-incremental: the task is inferred per sample (``task_inference="entropy"``, the
paper's HNET+ENT): for every learned embedding the target net's softmax is computed, the
embedding with the lowest predictive entropy answers, with its argmax. Class-incremental is
refused (``SCENARIO_NOTE``): with split streams each embedding's net has a head of a few
classes, and a two-class head is as confident on the other tasks' digits as on its own (on
2-task split digits the inference picked task 0 for 70-95% of task 1's samples; the paper
reports 69% accuracy for HNET+ENT on class-incremental split MNIST). ``infer_tasks`` and
the training loss still use each task's own output units, so the class case would run.

Parameters and memory. The embeddings of all ``info.num_tasks`` tasks exist from the start
(a ParameterList in ``self.model``: the optimizer sees them; one gets a gradient only while
its task trains, so the others keep their values and optimizer state), together with φ. The
only thing kept besides ``self.model`` is the regulariser's targets h*_t', one target-weight
vector per old task (recomputed from the frozen embeddings at each ``before_task``): that is
``stored_bytes``. ``resources()`` counts the hypernetwork and the embeddings, not the target
net's generated weights.

Choices and deviations from the paper:

- Weight scale: the target net's layer i uses s_i · h(e)_i, with the fixed s_i = 1/√fan_in_i
  (weights and biases of that layer), so the generated weights of a wide layer are not
  larger than those of a narrow one. At initialisation h(e) has a standard deviation of
  about 0.11 (defaults), so the target net starts with weights about 0.11/√fan_in, a few
  times smaller than PyTorch's default init. The paper uses no such scale (later work,
  "hyperfan" init, fixes the scale by initialisation). The regulariser is on the
  hypernetwork's outputs h(e), as in the paper, not on s·h.
- Initialisation: task and chunk embeddings N(0, 1), the hypernetwork's layers PyTorch's
  default, drawn at construction from the torch generator the Learner seeds with ``seed``
  (same seed, same network, like every backbone).
- Look-ahead (``lookahead=True``): the paper evaluates the regulariser at φ + Δφ, Δφ the
  (detached) step the task loss alone would take. Here Δφ = −lr·∇_φ CE, a plain gradient step
  at ``train.lr``, whatever the optimizer (the paper uses the optimizer's own step). Off by
  default, as in the paper's simpler variant.
- The regulariser sums over all old tasks at every step (no random subset of old tasks).
- Capacity: the default hypernetwork is wider than the target net's first layer asks for
  (``hnet_hidden`` [100, 250], 533k parameters against the target's 89.6k weights). With
  [100, 100] (218k), tuned lr and β, permuted MNIST with 5 tasks: seeds 3 and 5 of 0–5 each
  learned one task badly or not at all (59%; 11%, its loss stuck at ln 10) while the old
  tasks were kept: every change the task needed also moved the outputs held for the old
  tasks. [100, 250] learned every task of both seeds. Neither resetting Adam at each task
  (one seed of two fixed) nor starting a new embedding from the previous task's (worse:
  the held outputs sit at the very same point) was enough.
- A task not learned yet (the R matrix above its diagonal) is answered with its own, still
  untrained embedding in the task-incremental scenario; task inference only considers the
  learned ones.
- No generative replay / task-inference network (the paper's HNET+R, HNET+TIR variants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from learners.backbones import ModelConfig
from learners.base import Learner, register
from learners.hparams import ConfigError, hp
from task_streams.base import StreamInfo, Task

TASK_INFERENCE = ("entropy",)
BACKBONES = ("mlp",)


@dataclass
class HypernetworkHParams:
    """Hyperparameters of the task-conditioned hypernetwork."""

    beta: float = hp(
        0.01,
        help="output regulariser strength β in (β/#old)·Σ‖h(e_old) − h*_old‖² (0 = no "
        "regulariser: fine-tuning of the hypernetwork)",
        low=0.0,
        search=(1e-3, 1.0),
        log=True,
    )
    embedding_dim: int = hp(32, help="size of each task embedding e_t", low=1)
    hnet_hidden: list[int] = hp(
        [100, 250],
        help="hidden layer widths of the hypernetwork MLP (ReLU); [] = linear. The last width "
        "bounds what the hypernetwork can still change for a new task once its outputs for "
        "the old ones are held (with [100, 100], 2 of 6 seeds learned one of 5 permuted-MNIST "
        "tasks badly or not at all: measured)",
    )
    chunk_size: int = hp(
        2000,
        help="target weights generated per hypernetwork pass (chunked hypernetwork, one "
        "learned chunk embedding per chunk); 0 = all weights in one pass, no chunking",
        low=0,
    )
    chunk_embedding_dim: int = hp(16, help="size of each chunk embedding (chunked only)", low=1)
    lookahead: bool = hp(
        False,
        help="evaluate the regulariser at φ − lr·∇φ CE (the paper's look-ahead Δφ, as a plain "
        "gradient step) instead of at φ",
    )
    task_inference: str = hp(
        "entropy",
        help="domain/class scenarios: how the task is inferred at test time; entropy = the "
        "embedding whose target net's prediction has the lowest entropy (HNET+ENT)",
        choices=TASK_INFERENCE,
    )

    def __post_init__(self) -> None:
        if any(int(w) < 1 for w in self.hnet_hidden):
            raise ConfigError(
                f"hypernetwork: hnet_hidden={list(self.hnet_hidden)} is not accepted; "
                "expected a list of positive integers"
            )


def target_shapes(config: ModelConfig, info: StreamInfo, where: str = "") -> list[tuple]:
    """Weight and bias shapes of the target MLP, layer by layer; ConfigError for a backbone
    other than mlp."""
    if config.backbone not in BACKBONES:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}model.backbone={config.backbone!r} is not accepted by hypernetwork (its "
            f"hypernetwork generates the weights of an MLP target network); accepted: "
            f"{', '.join(BACKBONES)}"
        )
    shapes, width = [], math.prod(info.input_shape)
    for h in [*config.hidden, info.num_classes]:
        shapes += [(int(h), width), (int(h),)]
        width = int(h)
    return shapes


class HyperNet(nn.Module):
    """h(e; φ): an MLP from a task embedding to the flat target weight vector (chunked: one
    pass per chunk, the task embedding concatenated with that chunk's embedding)."""

    def __init__(
        self,
        num_weights: int,
        embedding_dim: int,
        hidden: list[int],
        chunk_size: int,
        chunk_embedding_dim: int,
    ):
        super().__init__()
        self.num_weights = num_weights
        if chunk_size > 0:
            chunks = math.ceil(num_weights / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(chunks, chunk_embedding_dim))
            width, out = embedding_dim + chunk_embedding_dim, chunk_size
        else:
            self.chunk_embeddings = None
            width, out = embedding_dim, num_weights
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, out))
        self.body = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(k, embedding_dim) embeddings -> (k, num_weights) target weight vectors."""
        k = embeddings.shape[0]
        if self.chunk_embeddings is None:
            return self.body(embeddings)
        chunks = self.chunk_embeddings.shape[0]
        inputs = torch.cat(
            [
                embeddings.unsqueeze(1).expand(k, chunks, -1),
                self.chunk_embeddings.unsqueeze(0).expand(k, chunks, -1),
            ],
            dim=2,
        )
        return self.body(inputs).reshape(k, -1)[:, : self.num_weights]


class HypernetworkModel(nn.Module):
    """The task embeddings and the hypernetwork; the target MLP is functional (its weights
    are the hypernetwork's outputs)."""

    def __init__(
        self, shapes: list[tuple], num_tasks: int, hparams: HypernetworkHParams, dropout: float
    ):
        super().__init__()
        self.shapes = shapes
        self.dropout = dropout
        self.scales = [
            1.0 / math.sqrt(s[1] if len(s) == 2 else shapes[i - 1][1]) for i, s in enumerate(shapes)
        ]
        num_weights = sum(math.prod(s) for s in shapes)
        self.task_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(hparams.embedding_dim)) for _ in range(num_tasks)
        )
        self.hnet = HyperNet(
            num_weights,
            hparams.embedding_dim,
            list(hparams.hnet_hidden),
            hparams.chunk_size,
            hparams.chunk_embedding_dim,
        )

    @property
    def num_weights(self) -> int:
        return self.hnet.num_weights

    def generate(self, task_ids: list[int]) -> torch.Tensor:
        """h(e_t; φ) for each task id: (len(task_ids), num_weights)."""
        return self.hnet(torch.stack([self.task_embeddings[t] for t in task_ids]))

    def target(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The target MLP's logits for ``x`` with the flat ``weights`` (scaled per layer)."""
        h, offset = x.flatten(1), 0
        params = []
        for shape, scale in zip(self.shapes, self.scales, strict=True):
            n = math.prod(shape)
            params.append(weights[offset : offset + n].reshape(shape) * scale)
            offset += n
        layers = len(params) // 2
        for i in range(layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < layers - 1:
                h = F.dropout(h.relu(), self.dropout, self.training)
        return h

    def forward(self, x: torch.Tensor, task_id: int = 0) -> torch.Tensor:
        """Task ``task_id``'s target net on ``x`` (all output units)."""
        return self.target(x, self.generate([task_id])[0])


@register("hypernetwork")
class Hypernetwork(Learner):
    """A hypernetwork generates the target net's weights from a per-task embedding; an output
    regulariser keeps its outputs for old embeddings fixed."""

    HParams = HypernetworkHParams
    SCENARIOS = ("task", "domain")
    SCENARIO_NOTE = (
        "class-incremental needs the task inferred among heads of few classes, where the "
        "entropy of the predictions does not tell the task apart (a two-class head is "
        "confident on the other tasks' classes too; the paper's HNET+ENT: 69% on split MNIST)"
    )

    @classmethod
    def check_model(cls, model: ModelConfig, info: StreamInfo, where: str) -> None:
        """ConfigError for a backbone other than mlp."""
        target_shapes(model, info, where)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_mask = self.info.class_mask().to(self.device)  # each task's own units
        self.learned: list[int] = []  # task ids learned, in order
        self.old_tasks: list[int] = []  # the regulariser's tasks and targets h*
        self.targets = torch.empty(0, self.model.num_weights, device=self.device)

    def build_model(self) -> nn.Module:
        """Task embeddings and the hypernetwork for the configured MLP's weights."""
        shapes = target_shapes(self.model_config, self.info, f"method {self.name}")
        return HypernetworkModel(
            shapes, self.info.num_tasks, self.hparams, self.model_config.dropout
        )

    # ------------------------------------------------------------------ forward
    def task_logits(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        """Task ``task_id``'s target net on ``x``, units outside the task's classes masked."""
        out = self.model(x, task_id)
        return out.masked_fill(~self.task_mask[task_id], float("-inf"))

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample through its task's target net, its task's units only; without task
        ids, the newest learned task's net, all units."""
        if task_ids is None:
            return self.model(x, self.learned[-1] if self.learned else 0)
        ids = task_ids.unique().tolist()
        if len(ids) == 1:
            return self.task_logits(x, ids[0])
        out = x.new_empty(x.shape[0], self.info.num_classes)
        for k in ids:
            rows = task_ids == k
            out[rows] = self.task_logits(x[rows], k)
        return out

    # ------------------------------------------------------------------ training
    def before_task(self, task: Task) -> None:
        """The regulariser's targets: h(e_t'; φ) now, for every task learned before this one."""
        self.old_tasks = [k for k in self.learned if k != task.id]
        with torch.no_grad():
            if self.old_tasks:
                self.targets = self.model.generate(self.old_tasks).detach().clone()
            else:
                self.targets = torch.empty(0, self.model.num_weights, device=self.device)

    def regulariser(self, phi: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(1/#old)·Σ_old ‖h(e_old; φ) − h*_old‖² (without β), at the hypernetwork
        parameters ``phi`` if given (the look-ahead), else at the current ones."""
        if not self.old_tasks:
            return torch.zeros((), device=self.device)
        e = torch.stack([self.model.task_embeddings[k] for k in self.old_tasks]).detach()
        hnet = self.model.hnet
        out = hnet(e) if phi is None else functional_call(hnet, phi, (e,))
        return (out - self.targets).pow(2).sum(dim=1).mean()

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """CE of the task's target net + β · regulariser (at φ + Δφ with ``lookahead``)."""
        ce = F.cross_entropy(self.logits(x, t), y)
        beta = self.hparams.beta
        if beta == 0 or not self.old_tasks:
            return ce
        phi = None
        if self.hparams.lookahead:
            named = dict(self.model.hnet.named_parameters())
            grads = torch.autograd.grad(
                ce, list(named.values()), retain_graph=True, allow_unused=True
            )
            lr = self.train_config.lr
            phi = {
                n: p if g is None else p - lr * g.detach()
                for (n, p), g in zip(named.items(), grads, strict=True)
            }
        return ce + beta * self.regulariser(phi)

    def after_task(self, task: Task) -> None:
        """Remember the task as learned (its embedding is frozen from now on)."""
        if task.id not in self.learned:
            self.learned.append(task.id)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inferred task ids, predictions) per sample: the learned embedding whose target
        net's softmax over its task's classes has the lowest entropy (HNET+ENT)."""
        candidates = sorted(self.learned) or [0]
        entropies, answers = [], []
        for k in candidates:
            out = self.task_logits(x, k)
            entropies.append(torch.special.entr(out.softmax(dim=1)).sum(dim=1))
            answers.append(out.argmax(dim=1))
        best = torch.stack(entropies).argmin(dim=0)
        tasks = torch.tensor(candidates, device=x.device)[best]
        return tasks, torch.stack(answers).gather(0, best.unsqueeze(0)).squeeze(0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Task scenario: the given task's embedding answers. Domain/class: the task is
        inferred per sample (``task_id`` is not used)."""
        if self.class_mask is not None:
            return super().predict(x, task_id)
        was_training = self.model.training
        self.model.eval()
        bs = self.train_config.eval_batch_size
        out = [self.infer_tasks(x[s : s + bs])[1] for s in range(0, x.shape[0], bs)]
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The learned task ids, the regulariser's tasks and its targets."""
        return {
            "learned": list(self.learned),
            "old_tasks": list(self.old_tasks),
            "targets": self.targets,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        self.learned = [int(k) for k in state["learned"]]
        self.old_tasks = [int(k) for k in state["old_tasks"]]
        self.targets = state["targets"].to(self.device)

    def stored_memory(self) -> dict[str, int]:
        """No samples; the regulariser's targets (one target-weight vector per old task)."""
        return {
            "stored_samples": 0,
            "stored_bytes": self.targets.numel() * self.targets.element_size(),
        }
