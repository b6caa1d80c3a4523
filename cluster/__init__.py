"""Cluster: connecting to Ray clusters and the files to stand one up."""

from cluster.ray_cluster import (
    LOOPBACK,
    check_address,
    cluster_nodes,
    describe_plan,
    ensure_ray,
    plan_actors,
)

__all__ = [
    "LOOPBACK", "check_address", "cluster_nodes", "describe_plan", "ensure_ray", "plan_actors",
]  # fmt: skip
