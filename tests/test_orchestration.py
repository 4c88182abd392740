"""The supervisor behind `make airflow` (visrec.orchestration.supervisor) on real child processes,
and the Airflow launcher's settings. The launcher with Airflow itself:
tests/integration/test_airflow_launcher.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from visrec.orchestration.airflow_local import airflow_env, client_url, login_lines

CHILD = Path(__file__).with_name("supervised_child.py")
# The supervisor as the launcher runs it: a server stopped last, an obedient command that leaves
# a daemon behind (new session, parent gone), a command that ignores SIGTERM.
DRIVER = """
import os, sys
from visrec.orchestration.supervisor import Supervisor
child, events, grace, extra = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
supervisor = Supervisor(os.environ, grace=grace)
py = sys.executable

def start():
    supervisor.start("server", [py, child, events, "server"], stop_last=True)
    supervisor.start("obedient", [py, child, events, "obedient", "--daemon"])
    supervisor.start("stubborn", [py, child, events, "stubborn", "--ignore-term", *extra])

sys.exit(supervisor.supervise(start))
"""
NAMES = ("server", "obedient", "obedient-daemon", "stubborn")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Driver:
    """The driver above in a session of its own; its children's pids from the events file."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.events = tmp_path / "events.txt"
        self.output = tmp_path / "supervisor.out"
        with self.output.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(CHILD), str(self.events), "1", *extra],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: dict[str, int] = wait_for(self._started, 60, "the children to start")
        self.pgids = {name: os.getpgid(pid) for name, pid in self.pids.items() if alive(pid)}

    def lines(self) -> list[str]:
        return self.events.read_text().splitlines() if self.events.exists() else []

    def _started(self) -> dict[str, int] | None:
        pids = {line.split()[0]: int(line.split()[2]) for line in self.lines() if " pid " in line}
        return pids if set(pids) == set(NAMES) else None

    def kill_leftovers(self) -> None:
        for pid in [self.proc.pid, *self.pids.values()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture()
def driver(tmp_path):
    made = []

    def make(*extra: str) -> Driver:
        made.append(Driver(tmp_path, *extra))
        return made[-1]

    yield make
    for d in made:
        d.kill_leftovers()


def test_sigterm_stops_every_process_the_server_last(driver):
    d = driver()
    assert len(set(d.pgids[name] for name in ("server", "obedient", "stubborn"))) == 1  # one group
    daemon = psutil.Process(d.pids["obedient-daemon"])
    assert d.pgids["obedient-daemon"] != d.pgids["server"] and daemon.ppid() == d.proc.pid  # adopted

    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    assert not [name for name, pid in d.pids.items() if alive(pid)]
    terms = {line.split()[0]: line for line in d.lines() if " TERM " in line}
    assert sorted(terms) == sorted(NAMES) and len(terms) == len([ln for ln in d.lines() if " TERM " in ln])
    assert terms["server"].endswith("running: ")  # the server is stopped once every other process is gone
    output = d.output.read_text()
    assert f"SIGKILL to: {d.pids['stubborn']} " in output  # it ignored SIGTERM for the grace period
    assert "received SIGTERM" in output and output.rstrip().endswith("stopped")


def test_a_command_that_exits_stops_the_others(driver):
    d = driver("--exit-after", "1")  # the stubborn command exits by itself (code 3)
    assert d.proc.wait(timeout=60) == 1
    assert not [name for name, pid in d.pids.items() if alive(pid)]
    assert "stubborn exited with code 3" in d.output.read_text()


def test_airflow_env_binds_to_the_given_host_and_keeps_deliberate_settings(tmp_path):
    base = {"PATH": "/usr/bin", "AIRFLOW_HOME": "/elsewhere", "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "7", "VISREC_REPO": "/data/repo"}
    env = airflow_env(base, tmp_path / "repo", tmp_path / "home", port=18080)
    assert env["AIRFLOW_HOME"] == str(tmp_path / "home")  # the launcher's own settings win
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(tmp_path / "repo" / "dags")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert (env["AIRFLOW__API__HOST"], env["AIRFLOW__API__PORT"]) == ("127.0.0.1", "18080")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__PARALLELISM"] == "7" and env["VISREC_REPO"] == "/data/repo"  # the user's

    env = airflow_env({"PATH": "/usr/bin"}, tmp_path / "repo", tmp_path / "home", host="0.0.0.0")
    assert env["AIRFLOW__API__HOST"] == "0.0.0.0"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8080/execution/"
    assert env["AIRFLOW__CORE__PARALLELISM"] == str(len(os.sched_getaffinity(0)))
    assert env["VISREC_REPO"] == str(tmp_path / "repo")
    assert client_url("::1", 8080) == "http://[::1]:8080"


def test_login_lines_read_the_generated_passwords(tmp_path):
    env = {"AIRFLOW_HOME": str(tmp_path)}
    assert "no generated passwords" in login_lines(env)[0]
    (tmp_path / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": "s3cret"}))
    assert login_lines(env)[0].startswith("login: admin / s3cret ")
