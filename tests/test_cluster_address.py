"""`lia run --address` connects to a running (multi-node) Ray cluster instead of starting one."""

from __future__ import annotations

import ray
from conftest import tiny_config, write_config
from mlflow.tracking import MlflowClient

from orchestrator.cli import main


def test_lia_run_connects_to_an_existing_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        config = tiny_config(tmp_path, name="on-cluster", methods={"finetune": {}})
        path = write_config(tmp_path, config)
        assert main(["run", str(path), "--no-progress", "--address", cluster.address]) == 0
        assert not ray.is_initialized()  # the driver disconnects when done
        client = MlflowClient(tracking_uri=config["tracking"]["uri"])
        runs = client.search_runs(
            [client.get_experiment_by_name("on-cluster").experiment_id],
            filter_string="tags.run_key != ''",
        )
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
        # one CPU per node: the two concurrent runs' actors were placed on both nodes
        known = {cluster.head_node.node_id} | {n.node_id for n in cluster.worker_nodes}
        assert {r.data.tags["node"] for r in runs} == known
    finally:
        cluster.shutdown()
