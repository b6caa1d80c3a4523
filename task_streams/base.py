"""The data contracts every learner and the orchestrator rely on: Task, TaskStream, StreamInfo."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCENARIOS = ("task", "domain", "class")


@dataclass
class Task:
    """One task of a stream: train and test tensors plus the classes it uses.

    Inputs are float32 tensors shaped (N, C, H, W) with values in [0, 1]; labels are int64.
    """

    id: int
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]

    def to(self, device: torch.device | str) -> Task:
        """Return a copy of this task whose tensors live on ``device``."""
        return Task(
            id=self.id,
            name=self.name,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            classes=self.classes,
        )

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclass(frozen=True)
class StreamInfo:
    """What a learner may know about a stream before seeing any data."""

    name: str
    scenario: str
    input_shape: tuple[int, ...]
    num_classes: int
    task_names: tuple[str, ...]
    task_classes: tuple[tuple[int, ...], ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def class_mask(self) -> torch.Tensor:
        """Bool (num_tasks, num_classes) mask: which output units each task may use."""
        mask = torch.zeros(self.num_tasks, self.num_classes, dtype=torch.bool)
        for task_id, classes in enumerate(self.task_classes):
            mask[task_id, list(classes)] = True
        return mask


@dataclass
class TaskStream:
    """An ordered sequence of tasks sharing one scenario, input shape and label space."""

    name: str
    scenario: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    num_classes: int
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        for position, task in enumerate(self.tasks):
            if task.id != position:
                raise ValueError(f"task {task.name!r} has id {task.id}, expected {position}")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def info(self) -> StreamInfo:
        return StreamInfo(
            name=self.name,
            scenario=self.scenario,
            input_shape=tuple(self.input_shape),
            num_classes=self.num_classes,
            task_names=tuple(t.name for t in self.tasks),
            task_classes=tuple(tuple(t.classes) for t in self.tasks),
        )

    def to(self, device: torch.device | str) -> TaskStream:
        """Return a copy of the stream with every task's tensors on ``device``."""
        return TaskStream(
            name=self.name,
            scenario=self.scenario,
            tasks=[t.to(device) for t in self.tasks],
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            metadata=dict(self.metadata),
        )
