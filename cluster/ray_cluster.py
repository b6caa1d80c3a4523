"""Connecting to Ray, and planning how many StreamRunner actors a cluster fits.

``ensure_ray`` connects to ``ray.address`` / $RAY_ADDRESS (after checking, with a short
timeout, that something listens there) or starts Ray on this machine. A Ray started here
listens on the loopback interface only: its node address is 127.0.0.1, which makes every
server of that instance (GCS, raylet node and object managers, driver and worker gRPC, the
runtime-env agent; and the dashboard agent's HTTP, gRPC and metrics servers, which a minimal
install without prometheus_client does not open) bind 127.0.0.1 instead of all interfaces.
tests/test_ray_binding.py checks it with the sockets the processes actually hold.

``plan_actors`` and ``describe_plan`` are pure functions of the cluster's resources, so a plan
can be checked before Ray starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from learners import ConfigError

if TYPE_CHECKING:  # orchestrator.config imports learners and streams; keep this module light
    from orchestrator.config import RayConfig, ResourcesConfig

__all__ = [
    "LOOPBACK", "check_address", "cluster_nodes", "describe_plan", "ensure_ray", "plan_actors",
]  # fmt: skip

LOOPBACK = "127.0.0.1"
"""the node address of a Ray instance started by :func:`ensure_ray`"""

_PASS_THROUGH = ("auto", "local")


def ensure_ray(config: RayConfig) -> bool:
    """Connect to ``ray.address`` / $RAY_ADDRESS, or start Ray locally.

    True if this call started or connected Ray (the caller then ``ray.shutdown()``s when
    done); False if Ray was already initialised in this process.

    An address other than ``auto``/``local`` is checked first (:func:`check_address`), so an
    unreachable one is a :class:`ConfigError` within seconds instead of a hang in ``ray.init``.
    ``local`` (or no address) starts a new Ray instance on 127.0.0.1 with ``ray.num_cpus`` /
    ``ray.num_gpus``; it never attaches to an instance another process started.
    """
    import ray

    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        check_address(address, key="ray.address" if config.address else "$RAY_ADDRESS")
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    with _loopback_node_address(), _quiet_token_notice():
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            _node_ip_address=LOOPBACK,
        )
    return True


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this")


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Drop Ray's notice that it turned token authentication on for the local instance it
    starts (Ray >= 2.52, RAY_AUTH_MODE unset): news to nobody here, since that instance also
    listens on 127.0.0.1 only. Ray's warning that authentication is *off* is kept."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = _DropTokenNotice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep the loopback address.

    Ray's servers bind to loopback only when the node's address is exactly 127.0.0.1, ::1 or
    localhost, and bind every interface otherwise. But ``ray.init`` passes ``_node_ip_address``
    through ``services.resolve_ip_for_localhost``, which replaces a loopback address with the
    machine's network address (``get_node_ip_address``) whenever cluster mode is on, i.e. on
    Linux always. Turning cluster mode off (what $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does,
    but that is read once when Ray is imported) makes that lookup answer localhost. The
    switch is only consulted there and by ``ray start``; it is restored when ``ray.init``
    returns, and the processes Ray started have the node address on their command lines.
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is None:  # a Ray without the switch: leave it as it was
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = before


def check_address(address: str, timeout_s: float = 3.0, key: str = "ray.address") -> None:
    """Raise :class:`ConfigError` unless something accepts a TCP connection at ``address``.

    ``host:port`` and ``ray://host:port`` are probed (within ``timeout_s``, name lookup
    included); ``auto`` and ``local`` are left to Ray; any other form is refused, naming
    ``key`` (``ray.address`` or ``$RAY_ADDRESS``) and the accepted forms.
    """
    from orchestrator.config import parse_ray_address
    from orchestrator.net import probe_tcp

    target = parse_ray_address(address, key)
    if target is None:
        return
    reason = probe_tcp(*target, timeout_s=timeout_s)
    if reason is not None:
        raise ConfigError(
            f"{key}={address} is unreachable ({reason}); "
            "start the cluster (ray start --head) or fix ray.address / $RAY_ADDRESS"
        )


Resources = Mapping[str, float]


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _as_nodes(cluster: Resources | Sequence[Resources] | None) -> list[Resources]:
    if cluster is None:
        return cluster_nodes()
    if isinstance(cluster, Mapping):
        return [cluster]  # one node (or a cluster's totals)
    return list(cluster)


def _slots(node: Resources, cpus: float, gpus: float) -> int:
    """Runs of ``cpus`` CPUs and ``gpus`` GPUs that fit on one node at once."""
    slots = math.floor(float(node.get("CPU", 0.0)) / cpus + 1e-9)
    if gpus > 0:
        slots = min(slots, math.floor(float(node.get("GPU", 0.0)) / gpus + 1e-9))
    return slots


def plan_actors(
    resources: ResourcesConfig,
    pending: int,
    cluster: Resources | Sequence[Resources] | None = None,
) -> tuple[int, float, float]:
    """(number of actors, CPUs per actor, GPUs per actor) for what the cluster offers.

    ``cluster`` is one Ray resources dict (``{"CPU": 8.0, "GPU": 2.0, ...}``) or a list of them,
    one per node; None reads the live nodes of the connected cluster. A run must fit on one
    node, so the actors are counted node by node (4 nodes of 1.5 GPUs hold 4 runs of one GPU,
    not 6). At most ``pending`` actors (at least 1), at most ``resources.max_concurrent_runs``
    when that is set. A request no node can meet raises :class:`ConfigError` naming the key
    and the accepted maximum.
    """
    nodes = _as_nodes(cluster)
    where = "the Ray cluster" if len(nodes) <= 1 else "any node of the Ray cluster"
    most_cpus = max((float(n.get("CPU", 0.0)) for n in nodes), default=0.0)
    most_gpus = max((float(n.get("GPU", 0.0)) for n in nodes), default=0.0)
    cpus = float(resources.cpus_per_run)
    if cpus <= 0:
        raise ConfigError(f"resources.cpus_per_run={cpus:g} must be > 0")
    gpus = resources.gpus_per_run
    gpus = (1.0 if most_gpus >= 1 else 0.0) if gpus is None else float(gpus)
    if gpus > most_gpus + 1e-9:
        raise ConfigError(
            f"resources.gpus_per_run={gpus:g} but {where} has {most_gpus:g} GPUs; "
            f"accepted: at most {min(most_gpus, 1.0):g}"
        )
    slots = sum(_slots(n, cpus, gpus) for n in nodes)
    if resources.max_concurrent_runs:
        slots = min(slots, resources.max_concurrent_runs)
    if slots < 1:
        raise ConfigError(
            f"resources.cpus_per_run={cpus:g} does not fit {where} "
            f"({most_cpus:g} CPUs); accepted: at most {most_cpus:g}"
        )
    return max(1, min(slots, pending)), cpus, gpus


def describe_plan(
    runs: int,
    plan: tuple[int, float, float],
    cluster: Resources | Sequence[Resources] | None = None,
) -> str:
    """One line for the console: ``12 runs on 2 actors · 1 CPU + 1 GPU per run``; given the
    cluster's nodes, first what it holds: ``8 GPUs on 2 nodes → 32 concurrent runs at 0.25
    GPU each · ...``."""
    n_actors, cpus, gpus = plan
    device = f"{gpus:g} GPU" if gpus > 0 else "CPU only (no GPU requested or present)"
    line = f"{runs} runs on {n_actors} actors · {cpus:g} CPU + {device} per run"
    if cluster is None:
        return line
    nodes = _as_nodes(cluster)
    capacity = sum(_slots(n, cpus, gpus) for n in nodes)
    counted, each = ("GPU", gpus) if gpus > 0 else ("CPU", cpus)
    total = sum(float(n.get(counted, 0.0)) for n in nodes)
    many = "s" if len(nodes) != 1 else ""
    return (
        f"{total:g} {counted}s on {len(nodes)} node{many} → {capacity} concurrent runs at "
        f"{each:g} {counted} each · {line}"
    )
