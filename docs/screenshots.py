"""Screenshots of the MLflow UI over a small ``lia run``, for the README and docs.

    .venv/bin/python docs/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium]

In a temporary folder: ``mlflow server`` on 127.0.0.1 (SQLite store, proxied artifacts), a
``lia run`` of two methods on 5 permuted-digits tasks (about 30 s on 2 cores), then headless
Chromium (Debian's ``chromium``, driven by Playwright from the dev extra) at 1280x800 saves:

- ``experiment-runs.png``: the experiment page on its runs, the invocation's parent run
  expanded to show its child runs;
- ``run-forgetting-curve.png``: a child run's *Model metrics* tab filtered to ``acc_task_0``,
  the accuracy on task 0 after each task (its forgetting curve), and
  ``run-forgetting-curve-large.png``, that chart full screen;
- ``run-r-matrix.png``: the child run's *Artifacts* tab showing the heatmap ``r_matrix.png``;
- ``report-avg-accuracy.png``, ``report-forgetting.png``, ``report-r-matrix.png``: the
  figures ``lia report`` writes for the same experiment.

As a user would on MLflow >= 3.10, it first chooses *Model training* in the sidebar's
GenAI / Model training switch (a first visit opens experiments on the GenAI overview), and
closes the assistant panel that opens on a first visit.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from mlflow.tracking import MlflowClient
from playwright.sync_api import expect, sync_playwright

NAME = "lia-demo"
CHILD = "finetune-s0"  # the run whose forgetting curve and R matrix are shown
CONFIG = {
    "name": NAME,
    "methods": {"finetune": {}, "replay": {"buffer_size": 200}},
    "seeds": [0, 1],
    "stream": {
        "name": "permuted",
        "source": "digits",
        "num_tasks": 5,
        "train_per_task": 500,
        "test_per_task": 200,
    },
    "model": {"hidden": [64]},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.05},
}
VIEWPORT = {"width": 1280, "height": 800}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                return process, uri
        except requests.RequestException:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the MLflow server did not start within 90 s")


def run_lia(root: Path, uri: str) -> None:
    config = {
        **CONFIG,
        "tracking": {"uri": uri},
        "checkpoints": {"dir": str(root / "checkpoints")},
    }
    path = root / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(config))
    lia = Path(sys.executable).with_name("lia")
    subprocess.run([str(lia), "run", str(path), "--no-progress"], cwd=root, check=True)


def shoot(uri: str, chromium: str, out: Path) -> list[Path]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (child,) = [r for r in children if r.info.run_name == CHILD]
    run_page = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}"
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        expect.set_options(timeout=30_000)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.set_default_timeout(30_000)

        # the experiment list; choose Model training, close the assistant, open the experiment
        page.goto(f"{uri}/#/experiments")
        page.get_by_role("button", name="Model training", exact=True).click()
        close = page.get_by_role("button", name="Close", exact=True)
        close.click()
        expect(close).to_have_count(0)
        page.get_by_role("link", name=NAME, exact=True).click()
        page.wait_for_url(f"**/#/experiments/{experiment.experiment_id}/runs*")
        parent_link = page.get_by_role("link", name=parent.info.run_name, exact=True)
        page.get_by_role("gridcell").filter(has=parent_link).get_by_role("button").click()
        for run in children:
            expect(page.get_by_role("link", name=run.info.run_name, exact=True)).to_be_visible()
        saved.append(save(page, out / "experiment-runs.png"))

        # the child run's Model metrics tab, filtered to acc_task_0 (the search takes a regular
        # expression): its forgetting curve; then the same chart full screen
        page.goto(f"{run_page}/model-metrics")
        page.get_by_placeholder("Search metric charts").fill("^acc_task_0$")
        title = page.get_by_role("heading", name="acc_task_0", exact=True)
        expect(title).to_be_visible()
        expect(page.get_by_role("heading", name=re.compile("acc_task"))).to_have_count(1)
        saved.append(save(page, out / "run-forgetting-curve.png"))
        full_screen = page.locator('[data-component-id="fullscreen_button_chartcard"]')
        card = page.locator("div").filter(has=title).filter(has=full_screen).last
        card.locator(full_screen).click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("acc_task_0", exact=True).first).to_be_visible()
        page.mouse.move(0, 0)  # no hover toolbar on the chart
        saved.append(save(page, out / "run-forgetting-curve-large.png"))

        # the child run's artifacts, the heatmap selected
        page.goto(f"{run_page}/artifacts")
        page.get_by_text("r_matrix.png", exact=True).click()
        image = page.get_by_role("img", name="r_matrix.png")
        expect(image).to_be_visible()
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=image.element_handle())
        image.evaluate("e => e.scrollIntoView({block: 'end'})")  # all of it, axis labels too
        saved.append(save(page, out / "run-r-matrix.png"))
        browser.close()
    return saved


def save(page, path: Path) -> Path:
    page.wait_for_timeout(1500)  # let charts and images settle (the UI polls: never network-idle)
    page.screenshot(path=str(path))
    return path


def report_figures(uri: str, report: Path, out: Path) -> list[Path]:
    """``lia report``'s figures of the same experiment, copied as ``report-*.png``."""
    from orchestrator.report import write_report

    written = write_report(NAME, report, ["md"], uri)
    copies = []
    figures = {
        "curves": "report-avg-accuracy.png",
        "forgetting": "report-forgetting.png",
        "heatmap_finetune": "report-r-matrix.png",
    }
    for key, name in figures.items():
        target = out / name
        shutil.copyfile(written[key], target)
        copies.append(target)
    return copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lia-screenshots-") as tmp:
        root = Path(tmp)
        server, uri = start_server(root)
        try:
            run_lia(root, uri)
            shots = shoot(uri, args.chromium, args.out)
            shots += report_figures(uri, root / "report", args.out)
            for path in shots:
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
