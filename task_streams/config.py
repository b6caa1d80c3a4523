"""StreamConfig: the typed description of a task stream, and the stream-builder registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from task_streams.base import TaskStream

SOURCES = ("mnist5k", "digits", "fashion_mnist", "idx", "npz")
SPLIT_SCENARIOS = ("task", "class", "domain")


@dataclass
class StreamConfig:
    """Which stream to build. Together with a seed it determines every tensor of the stream."""

    name: str = "permuted"
    """builder: permuted | rotated | split | noisy_clean | domains (see STREAM_BUILDERS)"""
    source: str = "mnist5k"
    """mnist5k (bundled 5,000-image MNIST subset) | digits (sklearn 8x8) | fashion_mnist
    (Debian package) | idx (folder of MNIST-format IDX files, ``path``) | npz (file, ``path``)"""
    path: str | None = None
    """folder (idx) or file (npz) for user data"""
    num_tasks: int = 5
    """tasks in the stream; the domains stream takes it from ``domains`` (one task per entry)"""
    train_per_task: int = 0
    """training samples per task; 0 (default) takes every available sample"""
    test_per_task: int = 0
    """test samples per task; 0 (default) takes every available sample"""
    scenario: str | None = None
    """split streams: task | class | domain (default task); the others (one label space shared
    by every task): domain (default) | task (the task identity is given at test time)"""
    classes_per_task: int = 2
    """split streams: classes in each task"""
    min_angle: float = 0.0
    """rotated streams: smallest rotation in degrees"""
    max_angle: float = 180.0
    """rotated streams: largest rotation in degrees"""
    noise_std: float = 0.5
    """noisy_clean: std of the Gaussian pixel noise added in the noisy task (pixels in [0, 1])"""
    task_order: list[int] | None = None
    """a permutation of 0..num_tasks-1: the order tasks are presented in (default: natural)"""
    evaluate_on: str = "test"
    """test (default): tasks are tested on the source's test pool | validation: the source's
    training pool is split once (stratified, fixed seed, VALIDATION_FRACTION held out); tasks
    train on the rest and are tested on the held-out part, never touching the test pool (what
    ``lia sweep``'s heldout protocol tunes on)"""
    domains: list[str] | None = None
    """domains streams only: one task per entry, ``<source>`` or ``<source>:rot<degrees>``
    (rotated counterclockwise) or ``<source>:perm`` (a fixed random pixel permutation), the
    sources built-in ones of one input shape, e.g. [mnist5k, fashion_mnist, mnist5k:rot90];
    stream.num_tasks is set to its length, stream.source is not used (leave it unset)"""

    def __post_init__(self) -> None:
        # the domains stream has one task per entry: num_tasks follows, so whatever reads
        # stream.num_tasks (progress, reports) counts the tasks that will be built
        if self.name == "domains" and isinstance(self.domains, (list, tuple)):
            self.num_tasks = len(self.domains)


StreamBuilder = Callable[[StreamConfig, int], TaskStream]
STREAM_BUILDERS: dict[str, StreamBuilder] = {}


def register_stream(name: str) -> Callable[[StreamBuilder], StreamBuilder]:
    """Decorator: make a builder ``(config, seed) -> TaskStream`` available under ``name``."""

    def decorate(fn: StreamBuilder) -> StreamBuilder:
        STREAM_BUILDERS[name] = fn
        return fn

    return decorate
