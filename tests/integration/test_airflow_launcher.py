"""`make airflow`'s launcher (python -m visrec.orchestration.airflow_local) with real Airflow.

It starts the launcher on a free 127.0.0.1 port with a temporary AIRFLOW_HOME over this repo's
dags/, the retrain DAG scheduled every minute and unpaused at creation (test-only settings), and
VISREC_REPO pointing at a temporary folder holding only dvc.yaml and params.yaml (what the DAG
reads when it is parsed; tracking off): its tasks fail at once and touch nothing real.
Then: the scheduler creates a run by itself; the printed login works; a task's log is served by
the API without any log server; every listening socket of every process is on 127.0.0.1; after
SIGTERM to the launcher, every process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from .test_dvc_pipeline import set_params

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAG = "visrec_retrain"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; launcher output:\n{log.read_text()[-6000:]}")


def processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher and every process below it (it adopts orphans: nothing escapes its tree)."""
    try:
        return [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening(procs: list[psutil.Process]) -> set[tuple[str, int, str]]:
    found = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except psutil.NoSuchProcess:
            pass
    return found


def running(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_launcher_schedules_binds_loopback_only_and_stops_every_process(tmp_path):
    tasks_repo = tmp_path / "repo"
    tasks_repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", tasks_repo / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tasks_repo / "params.yaml")
    set_params(tasks_repo / "params.yaml", {"tracking.enabled": False})
    port = free_port()
    env = dict(os.environ, VISREC_REPO=str(tasks_repo), VISREC_RETRAIN_SCHEDULE="* * * * *",
               AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False", AIRFLOW__CORE__UNIT_TEST_MODE="False")
    env.pop("VISREC_SERVICE_URL", None)
    log = tmp_path / "launcher.out"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "visrec.orchestration.airflow_local", "--repo", str(REPO),
                                 "--home", str(tmp_path / "airflow_home"), "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    seen: set[int] = set()
    try:
        login = wait_for(lambda: re.search(r"login: (\S+) / (\S+)", log.read_text()), 420, "the login", log)
        text = log.read_text()
        assert f"dags unpause {DAG}" in text.split("login:")[0]  # the unpause line comes first
        api = f"http://127.0.0.1:{port}"
        token = requests.post(f"{api}/auth/token", json={"username": login[1], "password": login[2]},
                              timeout=30).json()["access_token"]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"

        def runs() -> list[dict]:
            response = session.get(f"{api}/api/v2/dags/{DAG}/dagRuns", timeout=30)
            return response.json()["dag_runs"] if response.status_code == 200 else []

        run = wait_for(runs, 240, "a run the scheduler creates", log)[0]
        assert run["run_type"] == "scheduled", run  # nobody triggered it
        assert session.get(f"{api}/api/v2/importErrors", timeout=30).json()["total_entries"] == 0

        # the first task succeeds (tracking off); its log comes from the log folder, no log server runs
        ti_url = f"{api}/api/v2/dags/{DAG}/dagRuns/{run['dag_run_id']}/taskInstances/start_tracking"
        wait_for(lambda: session.get(ti_url, timeout=30).json().get("state") == "success", 240,
                 "start_tracking to succeed", log)
        content = session.get(f"{ti_url}/logs/1", params={"full_content": "true"}, timeout=30,
                              headers={"Accept": "application/json"}).json()["content"]
        events = [str(item.get("event")) for item in content]
        assert any(e.startswith(str(tmp_path / "airflow_home" / "logs")) for e in events), events[:5]
        assert any("Done. Returned value was: None" in e for e in events), events[-10:]

        procs = processes(launcher)
        seen.update(p.pid for p in procs)
        sockets = listening(procs)
        assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in sockets}, sockets  # the API server
        assert {ip for ip, _, _ in sockets} == {"127.0.0.1"}, sockets  # no log server on 0.0.0.0 / [::]

        seen.update(p.pid for p in processes(launcher))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-6000:]
        wait_for(lambda: not running(seen), 30, f"every process to end ({running(seen)} left)", log)
    finally:  # after a failure too, nothing is left running
        seen.update(p.pid for p in processes(launcher))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
        for pid in running(seen | {proc.pid}):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
