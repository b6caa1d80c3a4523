"""What GEM and A-GEM share: episodic memories, batched memory gradients, weight decay.

- :class:`TaskMemories` keeps, for every task, the last ``per_task`` training samples it saw
  (a ring buffer per task, as in the GEM authors' code).
- :func:`task_gradients` gives the gradient of every task's memory loss from ONE batched pass,
  not one backward per task: for the project's MLP (:class:`learners.backbones.MLP`) a manual
  forward and backward of all memories at once (:class:`MemoryPass`), for any other model
  ``torch.func.vmap`` of ``grad`` over the task axis.
- :class:`GradientProjectionLearner` is the base of both methods: memory bookkeeping, weight
  decay folded into the gradient before the projection (the optimizer is built without it),
  the cheap conflict test, state and stored-memory accounting.

Cost. For a linear layer z = W a + b, the gradient of a sum of per-sample losses is
∂W = Σ_i δ_i a_iᵀ, ∂b = Σ_i δ_i (a_i the layer's input, δ_i = ∂loss/∂z_i), so one forward and
one backward of all memories give each task's ∂W_k as one batched matrix product. The
conflict test ⟨g_k, g⟩ < 0 needs less: the current batch's ∂W = Δ_bᵀ A_b (+ wd·W) has rank
≤ B (the batch size), so ⟨∂W_k, ∂W⟩ = Σ_{i∈k} δ_i · (A g_Wᵀ)_i with
A g_Wᵀ = (A A_bᵀ) Δ_b + wd·(Z − b), at N·B·(in + out) instead of N·in·out. The widest
layer's per-task gradients are then only formed on steps that violate a constraint. GEM's
memories stay fixed during a task, so :class:`InputLayerTracker` also keeps the first layer's
X W1ᵀ current across plain-SGD steps (a rank-B update per step) instead of recomputing it.

Not a method module (leading underscore): importing ``learners`` does not register it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from learners.backbones import MLP
from learners.base import Learner
from task_streams.base import Task


class TaskMemories:
    """Per-task ring buffers: the last ``per_task`` (x, y, task id) samples seen of each task."""

    def __init__(self, per_task: int):
        if per_task < 1:
            raise ValueError(f"per_task must be >= 1, got {per_task}")
        self.per_task = int(per_task)
        self.x: dict[int, torch.Tensor] = {}
        self.y: dict[int, torch.Tensor] = {}
        self.t: dict[int, torch.Tensor] = {}
        self.seen: dict[int, int] = {}

    def count(self, task_id: int) -> int:
        """How many samples of ``task_id`` are stored."""
        return min(self.seen.get(task_id, 0), self.per_task)

    def __len__(self) -> int:
        return sum(self.count(k) for k in self.seen)

    def task_ids(self) -> list[int]:
        """The tasks with at least one stored sample, in increasing order."""
        return sorted(k for k in self.seen if self.count(k) > 0)

    def reset(self, task_id: int) -> None:
        """Forget ``task_id``'s samples (a task that is learned again starts afresh)."""
        for store in (self.x, self.y, self.t, self.seen):
            store.pop(task_id, None)

    def add(self, task_id: int, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Write a batch of ``task_id`` into its ring: item i of the task goes to slot i mod m."""
        b = int(y.shape[0])
        if b == 0:
            return
        m = self.per_task
        if task_id not in self.x:
            self.x[task_id] = torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.y[task_id] = torch.empty((m, *y.shape[1:]), dtype=y.dtype, device=y.device)
            self.t[task_id] = torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
            self.seen[task_id] = 0
        seen = self.seen[task_id]
        self.seen[task_id] = seen + b
        if b > m:  # of a batch longer than the ring only the last m items survive
            x, y, t = x[b - m :], y[b - m :], t[b - m :]
            seen, b = seen + b - m, m
        start = seen % m
        head = min(b, m - start)  # slots start.. up to the end of the ring, then from slot 0
        for store, v in ((self.x, x), (self.y, y), (self.t, t)):
            store[task_id][start : start + head] = v[:head]
            if head < b:
                store[task_id][: b - head] = v[head:]

    def stored(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled part of ``task_id``'s ring, in slot order."""
        n = self.count(task_id)
        return self.x[task_id][:n], self.y[task_id][:n], self.t[task_id][:n]

    def concatenated(
        self, task_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every stored sample of ``task_ids`` in one (x, y, t) triple; None if there are none."""
        parts = [self.stored(k) for k in task_ids if self.count(k) > 0]
        if not parts:
            return None
        xs, ys, ts = zip(*parts, strict=True)
        return torch.cat(xs), torch.cat(ys), torch.cat(ts)

    def stacked(
        self, task_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x, y, task id, weight) shaped (T, m, ...): one row of memories per task.

        A task with fewer than m samples is padded with copies of its own samples (valid
        labels, finite losses) that get weight 0; the others weigh 1/count, so Σ weight·CE is
        each task's mean memory loss. None if no task has samples.
        """
        ids = [k for k in task_ids if self.count(k) > 0]
        if not ids:
            return None
        size = max(self.count(k) for k in ids)
        xs, ys, ts, ws = [], [], [], []
        for k in ids:
            n = self.count(k)
            x, y, t = self.stored(k)
            if n < size:
                index = (torch.arange(size) % n).to(x.device)
                x, y, t = x[index], y[index], t[index]
            weight = torch.zeros(size, dtype=x.dtype, device=x.device)
            weight[:n] = 1.0 / n
            xs.append(x)
            ys.append(y)
            ts.append(t)
            ws.append(weight)
        return torch.stack(xs), torch.stack(ys), torch.stack(ts), torch.stack(ws)

    def nbytes(self) -> int:
        """Bytes taken by the stored samples (inputs, labels and task ids)."""
        total = 0
        for k in self.x:
            n = self.count(k)
            total += n * sum(
                v[k][0].numel() * v[k].element_size() for v in (self.x, self.y, self.t)
            )
        return total

    def state_dict(self) -> dict[str, Any]:
        """Capacity and, per task, the samples seen and the filled part of its ring."""
        tasks = []
        for k in sorted(self.seen):
            x, y, t = self.stored(k)
            tasks.append(
                {"task": k, "seen": self.seen[k], "x": x.clone(), "y": y.clone(), "t": t.clone()}
            )
        return {"per_task": self.per_task, "tasks": tasks}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore what :meth:`state_dict` returned (moved to ``device`` if given)."""
        if int(state["per_task"]) != self.per_task:
            raise ValueError(
                f"memory state holds {state['per_task']} samples per task, this one {self.per_task}"
            )
        self.x, self.y, self.t, self.seen = {}, {}, {}, {}
        for entry in state["tasks"]:
            k = int(entry["task"])
            x, y, t = (entry[n] if device is None else entry[n].to(device) for n in "xyt")
            m, n = self.per_task, int(y.shape[0])
            self.x[k] = torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.y[k] = torch.empty((m, *y.shape[1:]), dtype=y.dtype, device=y.device)
            self.t[k] = torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
            self.x[k][:n], self.y[k][:n], self.t[k][:n] = x, y, t
            self.seen[k] = int(entry["seen"])


def _masked_logits(learner: Learner, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Task-incremental streams: units outside each row's task set to -inf (Learner.logits)."""
    if learner.class_mask is None:
        return out
    return out.masked_fill(~learner.class_mask[t], float("-inf"))


def task_gradients(
    learner: Learner,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
) -> list[torch.Tensor]:
    """∇θ Σ_i weight[k, i]·CE(f_θ(x[k, i]), y[k, i]) for every task row k, in one batched pass.

    Inputs are shaped (T, m, ...) as :meth:`TaskMemories.stacked` returns them. Returns one
    tensor per trainable parameter (in ``model.parameters()`` order), shaped (T, *param.shape).
    Task-incremental streams mask each row's logits to its task's output units, as
    :meth:`Learner.logits` does. The model is evaluated in eval mode (no dropout): the
    constraint is on the memory loss itself, and no random numbers are drawn.
    """
    layers = mlp_layers(learner.model)
    if layers is None:
        return vmap_task_gradients(learner, x, y, t, weight)
    tasks = int(y.shape[0])
    memory = MemoryPass(
        learner,
        layers,
        x.reshape(-1, *x.shape[2:]),
        y.reshape(-1),
        t.reshape(-1),
        weight.reshape(-1),
        tasks,
    )
    return memory.gradients()


def vmap_task_gradients(
    learner: Learner,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
) -> list[torch.Tensor]:
    """:func:`task_gradients` for any model: ``vmap(grad(task loss))`` over the task axis."""
    model = learner.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    masks = None if learner.class_mask is None else learner.class_mask[t[:, 0]]

    def task_loss(
        p: dict[str, torch.Tensor],
        xk: torch.Tensor,
        yk: torch.Tensor,
        wk: torch.Tensor,
        mk: torch.Tensor | None,
    ) -> torch.Tensor:
        out = functional_call(model, (p, frozen, buffers), (xk,))
        if mk is not None:
            out = out.masked_fill(~mk, float("-inf"))
        return (wk * F.cross_entropy(out, yk, reduction="none")).sum()

    in_dims = (None, 0, 0, 0, None if masks is None else 0)
    was_training = model.training
    model.eval()
    try:
        grads = vmap(grad(task_loss), in_dims=in_dims)(params, x, y, weight, masks)
    finally:
        model.train(was_training)
    return [grads[n] for n, _ in named]


# ---------------------------------------------------------------------- MLP fast path
def mlp_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The linear layers of a :class:`learners.backbones.MLP` laid out as it builds them
    (Flatten, then Linear, ReLU[, Dropout] repeated, then Linear), with every trainable
    parameter in one of them; None for any other model."""
    if not isinstance(model, MLP) or not isinstance(getattr(model, "net", None), nn.Sequential):
        return None
    modules = list(model.net)
    if not modules or not isinstance(modules[0], nn.Flatten) or modules[0].start_dim != 1:
        return None
    layers: list[nn.Linear] = []
    expect = "linear"
    for module in modules[1:]:
        if expect == "linear" and isinstance(module, nn.Linear):
            layers.append(module)
            expect = "relu"
        elif expect == "relu" and isinstance(module, nn.ReLU):
            expect = "linear_or_dropout"
        elif expect == "linear_or_dropout" and isinstance(module, nn.Dropout):
            expect = "linear"
        elif expect == "linear_or_dropout" and isinstance(module, nn.Linear):
            layers.append(module)
            expect = "relu"
        else:
            return None
    if expect != "relu":  # must end with a Linear
        return None
    owned = {id(p) for m in layers for p in m.parameters()}
    if any(p.requires_grad and id(p) not in owned for p in model.parameters()):
        return None
    return layers


class BatchFactors:
    """Each linear layer's input A_b and output z_b for the current batch (the latter with
    ``retain_grad``), so that after the backward ∂W = Δ_bᵀ A_b with Δ_b = z_b.grad, exactly as
    autograd formed it (dropout masks included). Filled by :meth:`forward`."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` for an MLP that :func:`mlp_layers` accepted: its Sequential's modules
        called in order (the very same computation), recording the linear layers."""
        h = x
        for module in model.net:
            if isinstance(module, nn.Linear):
                self.inputs[id(module)] = h.detach()
                h = module(h)
                if h.requires_grad:
                    h.retain_grad()
                self.outputs[id(module)] = h
            else:
                h = module(h)
        return h

    def complete(self) -> bool:
        """Every layer's input and output gradient are known."""
        return all(
            id(m) in self.outputs and self.outputs[id(m)].grad is not None for m in self.layers
        )

    def factors(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_b, Δ_b) of ``layer``, flattened to (rows, in) and (rows, out)."""
        a = self.inputs[id(layer)]
        d = self.outputs[id(layer)].grad
        return a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])


class MemoryPass:
    """A manual forward and backward of an MLP over memory rows (eval mode: no dropout).

    Rows are grouped into ``tasks`` equal consecutive blocks; the loss is
    Σ_i weight_i·CE_i (each block's mean loss when weights are 1/block size). Per linear layer
    it keeps the input a_i, the pre-activation z_i and δ_i = ∂loss/∂z_i, as (rows, features).
    ``first`` replaces the first layer's X Wᵀ (without bias) when the caller keeps it current
    (see :class:`InputLayerTracker`).
    """

    @torch.no_grad()
    def __init__(
        self,
        learner: Learner,
        layers: list[nn.Linear],
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        weight: torch.Tensor,
        tasks: int,
        first: torch.Tensor | None = None,
    ):
        self.layers, self.tasks = layers, tasks
        # model.parameters() order: mlp_layers() checked that these are all of them
        self.params = [
            p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad
        ]
        h = x.reshape(x.shape[0], -1)
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            self.inputs.append(h)
            if i == 0 and first is not None:
                z = first if layer.bias is None else first + layer.bias
            else:
                z = F.linear(h, layer.weight, layer.bias)
            self.outputs.append(z)
            if i + 1 < len(layers):
                h = z.relu()
        # ∂(Σ w_i CE_i)/∂logits = w_i (softmax − onehot); masked units get softmax 0. The
        # softmax as exp(z − logsumexp z) and ReLU's backward as threshold_backward: the same
        # values as torch.softmax / (z > 0)·d, several times faster on CPU for these shapes.
        logits = _masked_logits(learner, self.outputs[-1], t)
        d = (logits - logits.logsumexp(1, keepdim=True)).exp_()
        d.scatter_add_(1, y.unsqueeze(1), torch.full_like(d[:, :1], -1.0))
        d.mul_(weight.unsqueeze(1))
        deltas = [d]
        for i in range(len(layers) - 1, 0, -1):
            d = torch.ops.aten.threshold_backward(d @ layers[i].weight, self.outputs[i - 1], 0)
            deltas.append(d)
        self.deltas = deltas[::-1]

    def layer_gradients(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every task's (∂W, ∂b) of layer i, shaped (T, out, in) and (T, out)."""
        d = self.deltas[i].view(self.tasks, -1, self.deltas[i].shape[-1])
        a = self.inputs[i].view(self.tasks, -1, self.inputs[i].shape[-1])
        weight = torch.bmm(d.transpose(1, 2), a)
        return weight, (d.sum(1) if self.layers[i].bias is not None else None)

    @torch.no_grad()
    def gradients(self) -> list[torch.Tensor]:
        """Per-task gradients of every trainable parameter, in ``model.parameters()`` order."""
        by_param: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            dw, db = self.layer_gradients(i)
            by_param[id(layer.weight)] = dw
            if db is not None:
                by_param[id(layer.bias)] = db
        return [by_param[id(p)] for p in self.params]

    @torch.no_grad()
    def dots(
        self, batch: BatchFactors | None, weight_decay: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(⟨g_k, g⟩ for every task k, X g_W1ᵀ or None), g the current gradient in ``.grad``.

        ``.grad`` must hold the batch gradient with the weight decay already folded in. Per
        layer, ⟨∂W_k, g_W⟩ + ⟨∂b_k, g_b⟩ = Σ_{i∈k} δ_i·(A g_Wᵀ + g_b)_i; with the batch's
        factors A g_Wᵀ = (A A_bᵀ) Δ_b + wd·(Z − b) where that is cheaper than A g_Wᵀ itself.
        The first layer's X g_W1ᵀ is returned for :class:`InputLayerTracker` when it was formed
        that way.
        """
        tasks = self.tasks
        total = torch.zeros(tasks, dtype=self.deltas[0].dtype, device=self.deltas[0].device)
        first = None
        for i, layer in enumerate(self.layers):
            d, a = self.deltas[i], self.inputs[i]
            w, bias = layer.weight, layer.bias
            effect = None  # A g_Wᵀ + g_b: the current gradient's effect on the layer's outputs
            if w.requires_grad:
                out_f, in_f = w.shape
                factors = None if batch is None else batch.factors(layer)
                if factors is not None and factors[0].shape[0] * (in_f + out_f) < in_f * out_f:
                    a_b, d_b = factors
                    effect = (a @ a_b.T) @ d_b
                    if weight_decay != 0:
                        z = self.outputs[i] if bias is None else self.outputs[i] - bias
                        effect.add_(z, alpha=weight_decay)
                    if i == 0:
                        first = effect
                else:
                    effect = a @ w.grad.T
            if bias is not None and bias.requires_grad:
                effect = bias.grad.expand_as(d) if effect is None else effect + bias.grad
            if effect is not None:  # Σ_{i∈k} δ_i·effect_i for every task k at once
                total += (d * effect).view(tasks, -1).sum(1)
        return total, first


class InputLayerTracker:
    """X W1ᵀ for memory inputs X that stay fixed during a task, kept current across SGD steps.

    The first layer's X W1ᵀ is the costliest part of a memory pass (N·in·out). Between two
    plain SGD steps W1 moves by −lr·u with u = g (momentum 0) or the momentum buffer
    u = μ·u_prev + g, and g = Δ_bᵀ A_b + wd·W1 has rank ≤ B, so X gᵀ comes out of
    :meth:`MemoryPass.dots` at rank-B cost and X W1ᵀ is updated as P ← P − lr·X uᵀ.
    It is recomputed exactly at the first step of a task, after every projected step (the
    update then has the memory gradients in it), every ``refresh`` steps (float rounding), and
    whenever the optimizer is not plain SGD.
    """

    def __init__(self, x: torch.Tensor, layer: nn.Linear, refresh: int = 50):
        self.x = x.reshape(x.shape[0], -1)
        self.layer = layer
        self.refresh = refresh
        self.p: torch.Tensor | None = None  # X W1ᵀ (no bias) at the current W1
        self.u: torch.Tensor | None = None  # X uᵀ for the momentum buffer u
        self.age = 0
        self._pending: tuple[torch.Tensor, bool] | None = None

    @torch.no_grad()
    def current(self) -> torch.Tensor:
        """X W1ᵀ at the current weights (computed afresh when not kept up to date)."""
        if self.p is None:
            self.p = self.x @ self.layer.weight.T
            self.u = None
            self.age = 0
        return self.p

    def before_step(self, xg: torch.Tensor | None, optimizer: torch.optim.Optimizer) -> None:
        """Record the step's X gᵀ (None: the update is not known at low rank, recompute)."""
        self._pending = None
        if xg is None or not isinstance(optimizer, torch.optim.SGD):
            return
        weight = self.layer.weight
        group = next(
            (g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None
        )
        if group is None or group["nesterov"] or group["dampening"] != 0 or group["maximize"]:
            return
        if group["weight_decay"] != 0:
            return
        state = optimizer.state.get(weight, {})
        self._pending = (xg, state.get("momentum_buffer") is not None)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Advance X W1ᵀ by the step just taken (or drop it, to be recomputed)."""
        pending, self._pending = self._pending, None
        if pending is None or self.p is None or self.age + 1 >= self.refresh:
            self.p = self.u = None
            return
        xg, had_buffer = pending
        weight = self.layer.weight
        group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        momentum, lr = group["momentum"], group["lr"]
        if momentum == 0:
            step = xg
        else:
            if not had_buffer:  # SGD starts the buffer at g
                self.u = xg
            elif self.u is not None:
                self.u = self.u.mul_(momentum).add_(xg)
            else:  # a buffer from before: X uᵀ once, exactly
                self.u = self.x @ optimizer.state[weight]["momentum_buffer"].T
            step = self.u
        self.p = self.p - lr * step
        self.age += 1


# ---------------------------------------------------------------------- the base learner
class GradientProjectionLearner(Learner):
    """Base of GEM and A-GEM: per-task episodic memories and gradient surgery on the full update.

    Weight decay: SGD and Adam add ``weight_decay · θ`` to the gradient inside ``step()``, after
    ``after_backward``; the projection would then not see part of the update. So the optimizer
    is built with weight_decay = 0 and :meth:`fold_weight_decay` adds the same term to the
    gradient before the projection: the projected gradient is the whole (L2-regularised) update
    direction, and without memories the update is the one the optimizer would have made.
    """

    FIXED_NETWORK = True  # its projections work on gradients over a fixed set of parameters

    CAPTURE_BATCH: ClassVar[bool] = False
    """record the batch's per-layer factors in :meth:`loss` (MLP fast path, memories in use)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memories = TaskMemories(self.hparams.memories_per_task)
        self._current_task: int | None = None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._layers = mlp_layers(self.model)
        self._batch: BatchFactors | None = None
        self._uses_memory = False
        self.projected_steps = 0
        """steps of the current task whose gradient was projected (a diagnostic, not state)"""

    # ------------------------------------------------------------------ optimizer
    def make_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer with weight_decay = 0 (the decay is folded in, see above)."""
        cfg = self.train_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)

    def fold_weight_decay(self) -> list[torch.Tensor]:
        """Add weight_decay·θ to each gradient (as SGD/Adam would in step()); the gradients."""
        wd = self.train_config.weight_decay
        grads = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if wd != 0:
                p.grad.add_(p.detach(), alpha=wd)
            grads.append(p.grad)
        return grads

    # ------------------------------------------------------------------ objective
    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, computed as the base loss does; with CAPTURE_BATCH on the MLP fast
        path, records the batch's per-layer factors while past memories are in use."""
        if not (self.CAPTURE_BATCH and self._uses_memory and self._layers is not None):
            return super().loss(x, y, t)
        self._batch = BatchFactors(self._layers)
        out = self._batch.forward(self.model, x)
        if self.class_mask is not None:  # as Learner.logits
            out = out.masked_fill(~self.class_mask[t], float("-inf"))
        return F.cross_entropy(out, y)

    def take_batch_factors(self) -> BatchFactors | None:
        """The current batch's factors if complete (then the cheap dot products apply)."""
        batch, self._batch = self._batch, None
        return batch if batch is not None and batch.complete() else None

    # ------------------------------------------------------------------ memory
    def before_task(self, task: Task) -> None:
        """Start the task's memory afresh; later hooks see the other tasks' memories as past."""
        self.memories.reset(task.id)
        self._current_task = task.id
        past = [k for k in self.memories.task_ids() if k != task.id]
        self._uses_memory = bool(past)
        self.projected_steps = 0
        self.prepare_memories(past)

    def prepare_memories(self, past: list[int]) -> None:
        """Build whatever the method reads from the past tasks' memories during the task."""

    def after_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Write the incoming batch into the current task's ring buffer."""
        self.memories.add(self._current_task, x, y, t)

    def after_task(self, task: Task) -> None:
        """Stop using the memories until the next task starts."""
        self._uses_memory = False
        self._batch = None

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The episodic memories."""
        return {"memories": self.memories.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the episodic memories."""
        self.memories.load_state_dict(state["memories"], device=self.device)

    def stored_memory(self) -> dict[str, int]:
        """Samples in the memories and the bytes they take (inputs, labels, task ids)."""
        return {"stored_samples": len(self.memories), "stored_bytes": self.memories.nbytes()}
