"""cluster.ray_cluster: a Ray started by `lia run` listens on loopback only; planning actors
is a pure function of the cluster's resources; an unreachable address fails fast."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import ray

from cluster import LOOPBACK, check_address, describe_plan, ensure_ray, plan_actors
from learners import ConfigError
from orchestrator.config import RayConfig, ResourcesConfig


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # gRPC's dual-stack sockets report ::ffff:127.0.0.1
    return address.is_loopback


def _listening(processes) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process name) of every TCP socket in LISTEN state the processes own."""
    import psutil  # Ray's dependency (vendored in ray/thirdparty_files, on sys.path once ray is)

    found = []
    for proc in processes:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.pid, name))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # an idle worker that exited meanwhile
    return found


def test_locally_started_ray_listens_on_loopback_only(monkeypatch):
    import psutil

    from orchestrator.runner import make_runner_class

    assert not ray.is_initialized(), "another test left Ray running"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ensure_ray(RayConfig()) is True  # what `lia run` does without an address
    try:
        assert ray.util.get_node_ip_address() == LOOPBACK
        actor = make_runner_class(1, 0).remote(torch_threads=1)
        info = ray.get(actor.info.remote(), timeout=180)

        driver = psutil.Process()
        processes = [driver, *driver.children(recursive=True)]
        names = {p.pid: p.name() for p in processes}
        # a local Ray's processes are the driver's descendants: GCS and raylet are children,
        # agents and workers are the raylet's
        assert "gcs_server" in names.values() and "raylet" in names.values(), names
        assert info["pid"] in names

        sockets = _listening(processes)
        owners = {names.get(pid, "?") for _, _, pid, _ in sockets}
        # not vacuous: the GCS, the raylet, the driver's and the actor's gRPC servers listen
        assert {"gcs_server", "raylet"} <= owners, sockets
        assert {driver.pid, info["pid"]} <= {pid for _, _, pid, _ in sockets}, sockets
        exposed = [s for s in sockets if not _is_loopback(s[0])]
        assert not exposed, f"Ray sockets listening beyond loopback: {exposed}"
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def test_unreachable_address_is_a_config_error_before_ray_starts(monkeypatch):
    port = _free_port()
    with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port} is unreachable"):
        ensure_ray(RayConfig(address=f"127.0.0.1:{port}"))
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=r"ray start --head.*\$RAY_ADDRESS"):
        ensure_ray(RayConfig())
    assert not ray.is_initialized()


# ---------------------------------------------------------------- plan_actors: pure function

TWO_GPUS = {"CPU": 2.0, "GPU": 2.0, "memory": 1e9}
CPU_ONLY = {"CPU": 4.0, "memory": 1e9}


def test_plan_actors_fits_what_the_cluster_offers():
    # whole GPUs: one run per GPU, limited by the 2 GPUs
    assert plan_actors(ResourcesConfig(cpus_per_run=0.5, gpus_per_run=1), 10, TWO_GPUS) == (
        2,
        0.5,
        1,
    )
    # quarter GPUs: 8 GPU slots, and the 2 CPUs at 0.25 each allow 8 as well
    plan = plan_actors(ResourcesConfig(cpus_per_run=0.25, gpus_per_run=0.25), 20, TWO_GPUS)
    assert plan == (8, 0.25, 0.25)
    # never more actors than runs, nor than max_concurrent_runs
    assert plan_actors(ResourcesConfig(gpus_per_run=0.5), 1, TWO_GPUS)[0] == 1
    limited = ResourcesConfig(cpus_per_run=0.1, gpus_per_run=0.25, max_concurrent_runs=3)
    assert plan_actors(limited, 20, TWO_GPUS)[0] == 3
    # default: GPUs present -> one GPU per run; none -> CPU only
    assert plan_actors(ResourcesConfig(), 5, TWO_GPUS) == (2, 1.0, 1.0)
    assert plan_actors(ResourcesConfig(gpus_per_run=0), 5, TWO_GPUS)[2] == 0
    assert plan_actors(ResourcesConfig(), 12, CPU_ONLY) == (4, 1.0, 0.0)
    assert plan_actors(ResourcesConfig(cpus_per_run=1.5), 12, CPU_ONLY)[0] == 2
    # at least one actor even with nothing pending
    assert plan_actors(ResourcesConfig(), 0, CPU_ONLY)[0] == 1
    assert not ray.is_initialized()  # given the resources, no Ray is needed


def test_requests_the_cluster_cannot_meet_name_the_key_and_the_maximum():
    with pytest.raises(ConfigError, match=r"resources.cpus_per_run=4 does not fit.*at most 2$"):
        plan_actors(ResourcesConfig(cpus_per_run=4), 3, TWO_GPUS)
    with pytest.raises(ConfigError, match=r"resources.gpus_per_run=1 .*0 GPUs.*at most 0$"):
        plan_actors(ResourcesConfig(gpus_per_run=1), 3, CPU_ONLY)
    with pytest.raises(ConfigError, match=r"resources.gpus_per_run=0.5 .*at most 0.25$"):
        plan_actors(ResourcesConfig(gpus_per_run=0.5), 3, {"CPU": 2.0, "GPU": 0.25})
    with pytest.raises(ConfigError, match=r"resources.cpus_per_run=1 does not fit.*\(0 CPUs\)"):
        plan_actors(ResourcesConfig(), 3, {"memory": 1e9})  # a Ray started with num_cpus=0
    with pytest.raises(ConfigError, match=r"resources.cpus_per_run=0 must be > 0"):
        plan_actors(ResourcesConfig(cpus_per_run=0), 3, CPU_ONLY)


def test_describe_plan_keeps_the_console_wording():
    assert (
        describe_plan(12, (2, 1.0, 0.0))
        == "12 runs on 2 actors · 1 CPU + CPU only (no GPU requested or present) per run"
    )
    assert describe_plan(8, (8, 0.25, 0.25)) == "8 runs on 8 actors · 0.25 CPU + 0.25 GPU per run"


def test_a_plan_fits_runs_node_by_node_and_says_what_the_cluster_holds():
    """8 GPUs on 2 nodes at a quarter GPU each: 32 concurrent runs; a run never spans nodes."""
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0}]  # + a CPU head
    quarter = ResourcesConfig(cpus_per_run=0.5, gpus_per_run=0.25)
    plan = plan_actors(quarter, 100, nodes)
    assert plan == (32, 0.5, 0.25)
    assert describe_plan(100, plan, nodes).startswith(
        "8 GPUs on 3 nodes → 32 concurrent runs at 0.25 GPU each · 100 runs on 32 actors"
    )
    # 1.5 GPUs on each of 4 nodes: 4 runs of one GPU, not 6 (the totals would say 6)
    uneven = [{"CPU": 8.0, "GPU": 1.5}] * 4
    assert plan_actors(ResourcesConfig(gpus_per_run=1), 10, uneven)[0] == 4
    assert plan_actors(ResourcesConfig(gpus_per_run=1), 10, {"CPU": 32.0, "GPU": 6.0})[0] == 6
    # a run bigger than every node is refused, though the cluster's total would hold it
    with pytest.raises(ConfigError, match=r"cpus_per_run=6 does not fit any node .*at most 4$"):
        plan_actors(ResourcesConfig(cpus_per_run=6), 3, [{"CPU": 4.0}, {"CPU": 4.0}])
    cpu_plan = plan_actors(ResourcesConfig(cpus_per_run=2), 3, [{"CPU": 4.0}, {"CPU": 5.0}])
    assert describe_plan(3, cpu_plan, [{"CPU": 4.0}, {"CPU": 5.0}]).startswith(
        "9 CPUs on 2 nodes → 4 concurrent runs at 2 CPU each · 3 runs on 3 actors"
    )


# ---------------------------------------------------------------------------- check_address


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def test_check_address_refuses_a_port_nobody_listens_on_quickly():
    port = _free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"localhost:{port}"):
        with pytest.raises(ConfigError) as info:
            check_address(address)
        message = str(info.value)
        assert message.startswith(f"ray.address={address} is unreachable")
        assert "start the cluster (ray start --head) or fix ray.address / $RAY_ADDRESS" in message


def test_check_address_gives_up_after_the_timeout():
    # a listener whose accept queue is full: Linux drops further SYNs, so connecting hangs
    # (a remote address would not do here: a transparent proxy may accept any connection)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((LOOPBACK, 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued = []
        try:
            for _ in range(16):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                queued.append(client)
                client.settimeout(0.3)
                try:
                    client.connect((LOOPBACK, port))
                except TimeoutError:
                    break  # the queue is full
            else:
                pytest.fail("could not fill the listener's accept queue")
            with pytest.raises(ConfigError, match=r"unreachable \(no answer within 0.5 s\)"):
                check_address(f"ray://127.0.0.1:{port}", timeout_s=0.5)
        finally:
            for client in queued:
                client.close()


def test_check_address_accepts_a_listening_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((LOOPBACK, 0))
        server.listen()
        port = server.getsockname()[1]
        check_address(f"127.0.0.1:{port}")
        check_address(f"ray://127.0.0.1:{port}", timeout_s=1.0)


def test_check_address_leaves_auto_and_local_to_ray_and_refuses_other_forms():
    for address in ("auto", "local"):
        check_address(address, timeout_s=0.1)  # no connection tried, nothing raised
    for address in ("anyscale://my-cluster", "head:port", "head:70000", "http://head:8265"):
        with pytest.raises(ConfigError, match=r"\$RAY_ADDRESS="):
            check_address(address, timeout_s=0.1, key="$RAY_ADDRESS")


def test_the_token_notice_of_a_ray_lia_starts_is_silenced_and_nothing_else():
    """Ray >= 2.52 announces that it turned token authentication on for a local instance;
    lia's is loopback-only, so that notice is dropped; a filter that dropped every warning
    of that logger would also hide Ray's warning that authentication is *off*."""
    import logging
    import os
    import subprocess
    import sys

    script = """
import logging
from cluster import ensure_ray
from orchestrator.config import RayConfig
ensure_ray(RayConfig(num_cpus=1))
import ray
from ray._private.authentication import authentication_token_setup as setup
setup._warn_token_auth_disabled()  # still reaches the user
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "Token authentication is enabled" not in text
    assert "Token authentication is disabled" in text
    assert not logging.getLogger("ray._private.authentication.authentication_token_setup").filters
