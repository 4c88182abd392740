"""Airflow 3 on this machine with every listener on 127.0.0.1: what ``make airflow`` runs.

    python -m visrec.orchestration.airflow_local --repo . --home airflow_home [--host 127.0.0.1] [--port 8080]

It runs the components ``airflow standalone`` runs, but each as its own command, because only
then can each be told where to listen: ``airflow standalone`` starts the scheduler's and the
triggerer's log servers (8793, 8794) on every interface, and Airflow has no setting for their host.

* ``airflow db migrate``, then ``api-server --host HOST --port PORT`` (API and UI),
  ``scheduler --skip-serve-logs``, ``dag-processor``, ``triggerer --skip-serve-logs``, in one process
  group (:class:`~visrec.orchestration.supervisor.Supervisor`). No log server is needed on one
  machine: the API server reads task logs from the local log folder (``$AIRFLOW_HOME/logs``).
* LocalExecutor with at most one task per core; the API server is the only listener, on HOST
  (``--host 0.0.0.0`` opens it deliberately); the scheduler's health check, off by default, would
  listen there too.
* The login: the API server's SimpleAuthManager (Airflow's default, as in ``airflow standalone``)
  generates a password per user of ``[core] simple_auth_manager_users`` (``admin``) on first start,
  into ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``; printed once the API answers.
* On SIGTERM, SIGINT or SIGHUP (or if a component exits) every process is stopped, tasks included:
  SIGTERM, then SIGKILL to what still runs ``--grace`` seconds later; the API server last, so that
  a task stopped by SIGTERM can still report its end. Airflow answers SIGTERM to a Python task
  only with the operator's ``on_kill()``: such a task is killed, and reset by the next scheduler.

Settings given in the environment (``AIRFLOW__...``) win over the defaults below, except those
that make this launcher what it is: AIRFLOW_HOME, the dags folder, LocalExecutor, the API's host and port.
VISREC_REPO (the repo the tasks work on) defaults to ``--repo``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from visrec.orchestration.supervisor import Stopped, Supervisor

RETRAIN_DAG = "visrec_retrain"
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def airflow_executable() -> str:
    """``airflow`` beside this interpreter (the project venv), else whatever is on PATH."""
    local = Path(sys.executable).parent / "airflow"
    return str(local) if local.exists() else "airflow"


def client_url(host: str, port: int) -> str:
    """The URL this machine reaches a server listening on ``host``:``port`` at."""
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def airflow_env(base: Mapping[str, str], repo: Path, home: Path, host: str = "127.0.0.1", port: int = 8080,
                parallelism: int | None = None) -> dict[str, str]:
    """The environment of every Airflow component (see the module docstring)."""
    env = dict(base)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        # the tasks' supervisors talk to the API server (Airflow's default: http://localhost:8080)
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{client_url(host, port)}/execution/",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",
    })
    defaults = {
        "VISREC_REPO": str(repo),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # one task per core (Airflow's default is 32 worker processes); 0: as many per query
        "AIRFLOW__CORE__PARALLELISM": str(parallelism or len(os.sched_getaffinity(0))),
        "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "0",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": host,  # Airflow's default: 0.0.0.0
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def components(airflow: str, host: str, port: int) -> dict[str, list[str]]:
    """The long-lived commands, by name; the API server first (the others report to it)."""
    return {
        "api-server": [airflow, "api-server", "--host", host, "--port", str(port)],
        "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        "dag-processor": [airflow, "dag-processor"],
        "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
    }


def password_file(env: Mapping[str, str]) -> Path:
    """Where SimpleAuthManager keeps the passwords it generated."""
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"


def login_lines(env: Mapping[str, str]) -> list[str]:
    path = password_file(env)
    try:
        passwords = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"no generated passwords in {path}: the login is whatever the configured auth manager says"]
    return [f"login: {user} / {password}   (kept in {path})" for user, password in passwords.items()]


def wait_for_api(supervisor: Supervisor, url: str, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (stops early if a component exits or a signal arrives)."""
    waited = 0.0
    while waited < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own server)
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        supervisor.sleep(1.0)
        waited += 1.0
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the repo whose dags/ to run (default: .)")
    parser.add_argument("--home", type=Path, default=None, help="AIRFLOW_HOME (default: <repo>/airflow_home)")
    parser.add_argument("--host", default="127.0.0.1", help="the API server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parallelism", type=int, default=None, help="tasks at once (default: one per core)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL on stop")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the API server")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    home = (args.home or repo / "airflow_home").resolve()
    env = airflow_env(os.environ, repo, home, args.host, args.port, args.parallelism)
    airflow = airflow_executable()
    supervisor = Supervisor(env, grace=args.grace)
    url = client_url(args.host, args.port)

    def say(line: str) -> None:
        supervisor.say("visrec", line)

    def start() -> None:
        say(f"DAGs start paused; to run the retraining on its schedule: "
            f"AIRFLOW_HOME={home} {airflow} dags unpause {RETRAIN_DAG}")
        if (code := supervisor.run("db-migrate", [airflow, "db", "migrate"])) != 0:
            raise Stopped(f"airflow db migrate failed (exit code {code})", 1)
        for name, command in components(airflow, args.host, args.port).items():
            # the API server is stopped last: stopped tasks can still report how they ended
            supervisor.start(name, command, stop_last=name == "api-server")
        if not wait_for_api(supervisor, f"{url}/api/v2/monitor/health", args.ready_timeout):
            raise Stopped(f"the API server did not answer at {url} within {args.ready_timeout:g} s", 1)
        say(f"Airflow UI and API: {url}   (Ctrl-C stops every Airflow process)")
        for line in login_lines(env):
            say(line)

    return supervisor.supervise(start)


if __name__ == "__main__":
    sys.exit(main())
