"""A child process for tests/test_orchestration.py: records its pid and each SIGTERM (with the other
children still running then) in an events file.

    python supervised_child.py EVENTS NAME [--ignore-term] [--daemon] [--exit-after SECONDS]

--ignore-term: keep running after SIGTERM (only SIGKILL stops it); --daemon: first start a process
that leaves the process group (new session) and loses its parent, as a double-forked daemon does;
--exit-after: exit by itself (code 3) after that many seconds.
"""

import os
import signal
import subprocess
import sys
import time


def record(events: str, line: str) -> None:
    with open(events, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def others_running(events: str, name: str) -> list[str]:
    """The other children of the events file that are still running (not zombies)."""
    with open(events, encoding="utf-8") as f:
        pids = {line.split()[0]: line.split()[2] for line in f if " pid " in line}
    running = []
    for other, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                if other != name and f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(other)
        except OSError:
            pass
    return sorted(running)


def main() -> None:
    events, name, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    ignore = "--ignore-term" in flags

    def on_term(signum, frame):
        record(events, f"{name} TERM running: {','.join(others_running(events, name))}")
        if not ignore:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if "--daemon" in flags:  # an intermediate process starts the daemon in a new session, then exits
        starter = ("import subprocess, sys; subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]],"
                   " start_new_session=True)")
        subprocess.run([sys.executable, "-c", starter, __file__, events, f"{name}-daemon"], check=True)
    exit_after = float(flags[flags.index("--exit-after") + 1]) if "--exit-after" in flags else None
    record(events, f"{name} pid {os.getpid()} pgid {os.getpgid(0)}")
    started = time.monotonic()
    while exit_after is None or time.monotonic() - started < exit_after:
        time.sleep(0.1)
    sys.exit(3)


if __name__ == "__main__":
    main()
