"""The files that stand a cluster up (cluster/launcher, cluster/kuberay, cluster/head_node.sh).

The YAML files are checked against what consumes them: the launcher config against the
schema of the installed Ray, the RayJob entrypoint against `lia`'s own parser and config
loader, the Kubernetes manifests against each other (service names, ports, env vars). The
head-node script runs for real: PostgreSQL (installed with apt-get when missing) and an
MLflow server on free loopback ports, used through the URIs it prints, then stopped.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "launcher" / "aws-gpu.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
HEAD_SCRIPT = ROOT / "cluster" / "head_node.sh"
# local state a job's working dir must not carry to the cluster
MUST_EXCLUDE = {"mlflow.db", "mlruns", "checkpoints", ".venv"}


def _documents(path: Path, kind: str) -> list[dict]:
    """The documents of one kind in a (multi-document) manifest."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == kind]


def _one(path: Path, kind: str) -> dict:
    (document,) = _documents(path, kind)
    return document


def _env(container: dict) -> dict[str, str | None]:
    """A container's env as name -> literal value (None for one taken from a Secret)."""
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gpu_limit(group: dict) -> float:
    container = group["template"]["spec"]["containers"][0]
    return float(container["resources"]["limits"].get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------- cluster launcher (AWS)
def test_launcher_config_passes_the_schema_of_the_installed_ray():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # unknown or misspelt keys fail here too
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["head_node_type"] in config["available_node_types"]
    workers = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    for node in workers.values():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"]
    gpu_types = {name for name, node in workers.items() if node["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type offers a GPU"
    for name in gpu_types:  # the advertised GPU is an instance that has one (g4dn, g5, p4d...)
        assert re.match(r"[gp]\d", workers[name]["node_config"]["InstanceType"]), name
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0


def test_launcher_starts_tracking_then_ray_on_loopback_and_workers_join():
    config = yaml.safe_load(LAUNCHER.read_text())
    head = config["head_start_ray_commands"]
    tracking = next(i for i, c in enumerate(head) if "cluster/head_node.sh" in c)
    ray_start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    # Ray's processes, and so every job's driver, inherit the URIs head_node.sh wrote
    assert tracking < ray_start and "lia-head/env" in head[ray_start]
    assert "--data-dir ~/lia-head" in head[tracking]
    assert "--port=6379" in head[ray_start] and "--dashboard-host=127.0.0.1" in head[ray_start]
    assert any(
        "ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"]
    )
    starts = [c for c in head + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_installs_this_project_with_its_torch_pin():
    tomllib = pytest.importorskip("tomllib")
    config = yaml.safe_load(LAUNCHER.read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    setup = " ; ".join(config["setup_commands"])
    assert f"pip install -q {torch_pin}" in setup
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert (ROOT / "pyproject.toml").is_file()  # "." is the repository root `ray up` runs in
    assert f'pip install -q "$HOME/{remote.removeprefix("~/")}[cluster]"' in setup
    cluster_extra = project["optional-dependencies"]["cluster"]
    assert any(d.startswith("psycopg[binary]") for d in cluster_extra)  # the driver's URLs
    assert any(d.startswith("ray[default]") for d in cluster_extra)  # the job server
    assert MUST_EXCLUDE <= {p.removeprefix("**/") for p in config["rsync_exclude"]}


# ---------------------------------------------------------------- KubeRay
def test_raycluster_serves_mlflow_and_postgres_through_the_head_service():
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    head_pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    head = head_pod["containers"][0]
    assert head["image"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # listing ports replaces KubeRay's defaults: Ray's own must stay, or jobs cannot be submitted
    assert {6379, 8265, 10001} <= set(ports.values())
    service = f"{cluster['metadata']['name']}-head-svc"  # KubeRay's name for the head service
    env = _env(head)
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service}:{ports['mlflow']}"
    storage = env["LIA_OPTUNA_STORAGE"]
    assert storage.startswith("postgresql+psycopg://lia:$(DB_PASSWORD)@")
    assert f"@{service}:{ports['postgres']}/" in storage
    names = [e["name"] for e in head["env"]]  # $(VAR) is substituted only from earlier entries
    assert names.index("DB_PASSWORD") < names.index("LIA_OPTUNA_STORAGE")

    sidecars = {c["name"]: c for c in head_pod["initContainers"]}
    assert all(c.get("restartPolicy") == "Always" for c in sidecars.values())
    mlflow = sidecars["mlflow"]
    assert mlflow["command"] == ["mlflow", "server"]
    assert f"--port={ports['mlflow']}" in mlflow["args"] and "--host=0.0.0.0" in mlflow["args"]
    allowed = next(a for a in mlflow["args"] if a.startswith("--allowed-hosts="))
    assert f"{service}:*" in allowed.split("=", 1)[1].split(",")
    backend = _env(mlflow)["MLFLOW_BACKEND_STORE_URI"]
    postgres = _env(sidecars["postgres"])
    assert backend.endswith(f":{ports['postgres']}/{postgres['POSTGRES_DB']}")
    assert backend.startswith(f"postgresql+psycopg://{postgres['POSTGRES_USER']}:")
    # the Optuna database exists: the init script the postgres image runs creates it
    optuna_db = storage.rsplit("/", 1)[1]
    assert optuna_db != postgres["POSTGRES_DB"]  # both use a table named alembic_version
    init = _one(RAYCLUSTER, "ConfigMap")
    mounted = {v["name"]: v for v in head_pod["volumes"]}
    init_volume = next(
        m["name"]
        for m in sidecars["postgres"]["volumeMounts"]
        if m["mountPath"] == "/docker-entrypoint-initdb.d"
    )
    assert mounted[init_volume]["configMap"]["name"] == init["metadata"]["name"]
    assert f"CREATE DATABASE {optuna_db};" in init["data"].values()

    worker = cluster["spec"]["workerGroupSpecs"][0]
    assert _gpu_limit(worker) == 1
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    claims = {d["metadata"]["name"] for d in _documents(RAYCLUSTER, "PersistentVolumeClaim")}
    volumes = [*mounted.values(), *worker["template"]["spec"]["volumes"]]
    used = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }
    assert used and used <= claims  # the claims the pods mount are created by the same file


def test_rayjob_runs_lia_on_gpus_and_logs_to_the_long_lived_cluster():
    job = yaml.safe_load(RAYJOB.read_text())
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("lia ")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert MUST_EXCLUDE <= set(runtime_env["excludes"])
    spec = job["spec"]["rayClusterSpec"]
    assert _gpu_limit(spec["workerGroupSpecs"][0]) == 1
    head_env = _env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    long_lived_env = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    for name in ("MLFLOW_TRACKING_URI", "LIA_OPTUNA_STORAGE"):
        assert head_env[name] == long_lived_env[name], name
    # every variable the entrypoint reads through OmegaConf is set where the driver runs
    for name in re.findall(r"\$\{oc\.env:(\w+)\}", job["spec"]["entrypoint"]):
        assert head_env.get(name), name


def test_rayjob_entrypoint_is_a_lia_command_whose_config_loads(monkeypatch):
    """Parsed as the head's shell and `lia`'s own parser would, loaded with its overrides."""
    from orchestrator.cli import build_parser
    from orchestrator.config import load_config
    from sweeps.config import load_sweep_config

    entrypoint = yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"]
    words = shlex.split(entrypoint)
    assert words[0] == "lia"
    args, extra = build_parser().parse_known_args(words[1:])
    assert all("=" in e and not e.startswith("-") for e in extra)  # what `lia` accepts
    config_path = ROOT / args.config  # the working dir is the repository
    assert config_path.is_file(), f"{args.config} named by the entrypoint is not in the repo"
    storage = "postgresql+psycopg://lia:pw@lia-head-svc:5432/optuna"
    monkeypatch.setenv("LIA_OPTUNA_STORAGE", storage)
    overrides = [*args.overrides, *extra]
    if args.command == "sweep":
        config = load_sweep_config(config_path, overrides)
        assert config.sweep.storage == storage
    else:
        config = load_config(config_path, overrides)
    assert config.resources.gpus_per_run == 1
    assert config.checkpoints.dir.startswith("/shared/")  # the volume every pod mounts


# ---------------------------------------------------------------- head_node.sh
def test_head_node_script_help_and_refusals():
    done = subprocess.run([str(HEAD_SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in ("--host", "--port", "--pg-port", "--data-dir", "--artifacts", "--stop"):
        assert option in done.stdout
    done = subprocess.run([str(HEAD_SCRIPT), "--bogus"], capture_output=True, text=True)
    assert done.returncode != 0 and "unknown option --bogus" in done.stderr
    done = subprocess.run([str(HEAD_SCRIPT), "--port", "x"], capture_output=True, text=True)
    assert done.returncode != 0 and "expected a number" in done.stderr


def _pg_ctl() -> Path | None:
    """PostgreSQL's pg_ctl as head_node.sh finds it: on PATH, else Debian's newest version."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1] if found else None


def _install_postgresql() -> str | None:
    """apt-get install postgresql; None when done, else why it could not be."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not a Debian/Ubuntu machine)"
    if os.geteuid() == 0:
        prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    else:
        return "not root, and no sudo to run apt-get with"
    install = [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, capture_output=True, timeout=900).returncode == 0:
        return None
    update = subprocess.run([*prefix, "apt-get", "update", "-qq"], capture_output=True, timeout=600)
    if update.returncode != 0:
        return f"apt-get update failed: {update.stderr.decode(errors='replace')[-300:]}"
    done = subprocess.run(install, capture_output=True, timeout=900)
    if done.returncode != 0:
        return f"apt-get install postgresql failed: {done.stderr.decode(errors='replace')[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A head_node.sh instance of this module: how to call it and what it started."""

    data_dir: Path
    port: int
    pg_port: int
    env: dict[str, str]
    seen: set[int] = field(default_factory=set)  # every server pid seen, for the teardown
    first: subprocess.CompletedProcess | None = None  # the run that started the servers
    start_s: float = 0.0  # how long that took

    def run(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        args = ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        args += ["--pg-port", str(self.pg_port), "--workers", "1", "--timeout", "90"]
        done = subprocess.run(
            [str(HEAD_SCRIPT), *args, *extra],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=240,
        )
        assert not check or done.returncode == 0, done.stderr
        return done

    def server_processes(self) -> list[psutil.Process]:
        """The MLflow server and PostgreSQL's postmaster, with all their descendants."""
        pids = [int((self.data_dir / "mlflow" / "server.pid").read_text())]
        pids.append(int((self.data_dir / "postgres/data/postmaster.pid").read_text().split()[0]))
        processes = []
        for pid in pids:
            parent = psutil.Process(pid)
            processes += [parent, *parent.children(recursive=True)]
        self.seen |= {p.pid for p in processes}
        return processes


def _exports(stdout: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines head_node.sh prints."""
    return dict(re.findall(r"^export (\w+)=(\S+)$", stdout, flags=re.M))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def head():
    """head_node.sh started on free loopback ports in a folder of its own; stopped after."""
    if _pg_ctl() is None:
        why = _install_postgresql()
        if why is not None:
            pytest.skip(f"PostgreSQL cannot be installed here: {why}")
        assert _pg_ctl() is not None, "apt-get installed postgresql but pg_ctl is not found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and no 'postgres' user to run PostgreSQL as")
    # not under pytest's tmp folder: when root, the postgres user must traverse the parent
    base = Path(tempfile.mkdtemp(prefix="lia-head-"))
    base.chmod(0o711)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)
    instance = Head(base / "head", _free_port(), _free_port(), env)
    try:
        start = time.monotonic()
        instance.first = instance.run()
        instance.start_s = time.monotonic() - start
        yield instance
    finally:
        instance.run("--stop", check=False)
        for pid in instance.seen:  # a broken --stop must not leave servers behind
            if _alive(pid):
                psutil.Process(pid).kill()
        shutil.rmtree(base, ignore_errors=True)


def test_head_prints_loopback_uris_and_writes_them_to_its_env_file(head):
    exports = _exports(head.first.stdout)
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{head.port}"
    storage = exports["LIA_OPTUNA_STORAGE"]
    assert re.fullmatch(
        rf"postgresql\+psycopg://lia:[0-9a-f]{{32}}@127\.0\.0\.1:{head.pg_port}/optuna", storage
    )
    env_file = head.data_dir / "env"
    assert env_file.read_text().strip() == head.first.stdout.strip()
    assert env_file.stat().st_mode & 0o077 == 0  # it holds the database password
    assert (head.data_dir / "db_password").stat().st_mode & 0o077 == 0


def test_mlflow_through_the_printed_uri_stores_runs_and_proxies_artifacts(head, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = _exports(head.first.stdout)["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri)
    assert "Default" in {e.name for e in client.search_experiments()}
    experiment = client.create_experiment("head-node-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "ACC", 0.9)
    client.log_text(run.info.run_id, "forgets least", "notes/answer.txt")
    client.set_terminated(run.info.run_id)
    # proxied: the client holds an mlflow-artifacts: URI and never touches the folder itself
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    got = client.download_artifacts(run.info.run_id, "notes/answer.txt", str(tmp_path))
    assert Path(got).read_text() == "forgets least"
    stored = list((head.data_dir / "mlflow" / "artifacts").rglob("answer.txt"))
    assert [p.read_text() for p in stored] == ["forgets least"]
    assert client.get_run(run.info.run_id).data.metrics == {"ACC": 0.9}


def test_the_printed_optuna_url_holds_studies(head):
    import optuna

    from sweeps.study import check_storage

    url = _exports(head.first.stdout)["LIA_OPTUNA_STORAGE"]
    check_storage(url)  # the sweep's own preflight accepts it
    study = optuna.create_study(storage=url, study_name="head-node-check", direction="maximize")
    trial = study.ask()
    study.tell(trial, 0.5)
    again = optuna.load_study(storage=url, study_name="head-node-check")
    assert [t.value for t in again.get_trials()] == [0.5]


def test_servers_listen_on_loopback_only_and_hide_the_password(head):
    password = (head.data_dir / "db_password").read_text().strip()
    processes = head.server_processes()
    listening = [
        c.laddr
        for p in processes
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert {head.port, head.pg_port} <= {addr.port for addr in listening}
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
    for process in processes:  # passed through environments and stdin, never as arguments
        assert password not in " ".join(process.cmdline()), process.pid


def test_a_second_run_finds_everything_running(head):
    before = {p.pid for p in head.server_processes()}
    start = time.monotonic()
    again = head.run()
    assert time.monotonic() - start < min(10.0, head.start_s)
    assert again.stdout == head.first.stdout
    assert "already runs" in again.stderr
    assert {p.pid for p in head.server_processes()} == before


def test_stop_ends_every_process_and_a_restart_keeps_the_data(head):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_exports(head.first.stdout)["MLFLOW_TRACKING_URI"])
    kept = client.create_experiment("kept-across-restarts")
    pids = {p.pid for p in head.server_processes()}
    stopped = head.run("--stop")
    assert "stopped the MLflow server" in stopped.stderr and "stopped PostgreSQL" in stopped.stderr
    assert not [pid for pid in pids if _alive(pid)]
    for port in (head.port, head.pg_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert "not running" in head.run("--stop").stderr  # stopping twice is fine

    restarted = head.run()  # the cluster, roles and password were kept: same URIs, same data
    assert restarted.stdout == head.first.stdout
    assert "creating the database cluster" not in restarted.stderr
    assert "PostgreSQL started" in restarted.stderr
    assert client.get_experiment_by_name("kept-across-restarts").experiment_id == kept
