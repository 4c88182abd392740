"""Run a few long-lived commands as one unit, and leave no process behind when it stops.

* The commands share one new process group (``kill -- -<pgid>`` reaches them all), apart from the
  terminal's: Ctrl-C reaches only the supervisor, which then stops them in order.
* Their output is relayed line by line, prefixed with the command's name.
* On SIGTERM, SIGINT or SIGHUP, or when one command exits, every process the commands started is
  stopped, in two rounds: first every process but the commands started with ``stop_last`` (a
  server the others report to), then those. In each round each process gets SIGTERM once, and
  whatever is still running ``grace`` seconds later gets SIGKILL; a second signal skips the waiting.

"Every process" counts processes that left the group (Airflow runs each task in a process group of
its own) or lost their parent: the supervisor makes itself the child subreaper (Linux), so orphaned
descendants are re-parented to it, not to init, and it stops its descendants, not only the group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal arrived (exit code 0) or a command exited (exit code 1)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


def become_subreaper() -> bool:
    """Orphaned descendants get re-parented to this process instead of init (Linux >= 3.4)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> dict[int, str]:
    """``{pid: state}`` of every process below ``pid`` (read from /proc; state ``Z``: a zombie)."""
    parent_state: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]  # the name may hold ")"
            except (OSError, ValueError):  # exited meanwhile
                continue
            parent_state[int(entry.name)] = (int(ppid), state)
    children: dict[int, list[int]] = {}
    for child, (parent, _) in parent_state.items():
        children.setdefault(parent, []).append(child)
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found[current] = parent_state[current][1]
        todo.extend(children.get(current, []))
    return found


def command_line(pid: int, limit: int = 80) -> str:
    """The process's command line (its title, for processes that set one), shortened."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"
    return line if len(line) <= limit else line[:limit - 3] + "..."


class Supervisor:
    """``Supervisor(env).supervise(start)``: ``start`` starts commands (:meth:`start`, :meth:`run`);
    then the supervisor waits for a stop signal or a command's exit and stops every process.
    Call from the main thread (signal handlers)."""

    def __init__(self, env: Mapping[str, str], grace: float = 10.0, out: TextIO | None = None):
        self.env = dict(env)
        self.grace = grace
        self.out = out or sys.stdout
        self.procs: dict[str, subprocess.Popen] = {}  # the long-lived commands, by name
        self._popens: list[subprocess.Popen] = []  # every command started (they reap themselves)
        self._stop_last: list[subprocess.Popen] = []
        self.pgid: int | None = None
        self._signal: int | None = None
        self._hurry = False
        self._print_lock = threading.Lock()

    # ----------------------------------------------------------------------------- output

    def say(self, name: str, line: str) -> None:
        with self._print_lock:
            self.out.write(f"{name:<13} | {line}\n")
            self.out.flush()

    def _relay(self, name: str, stream: TextIO) -> None:
        for line in stream:
            self.say(name, line.rstrip("\n"))

    # ----------------------------------------------------------------------------- starting

    def _popen(self, name: str, argv: Sequence[str], process_group: int) -> subprocess.Popen:
        self.say("supervisor", f"starting {name}: {' '.join(argv)}")
        proc = subprocess.Popen(list(argv), env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                process_group=process_group)
        self._popens.append(proc)
        threading.Thread(target=self._relay, args=(name, proc.stdout), daemon=True).start()
        return proc

    def start(self, name: str, argv: Sequence[str], stop_last: bool = False) -> subprocess.Popen:
        """A long-lived command, in the commands' process group (the first one founds it).
        ``stop_last``: stopped only once every other process is (see :meth:`stop_all`)."""
        proc = self._popen(name, argv, process_group=self.pgid or 0)
        self.pgid = self.pgid or proc.pid
        self.procs[name] = proc
        if stop_last:
            self._stop_last.append(proc)
        return proc

    def run(self, name: str, argv: Sequence[str]) -> int:
        """A command that must finish before the others start; its exit code. Its own process group
        (once it exited, the commands' group could be gone before they join it); stopped like the others."""
        proc = self._popen(name, argv, process_group=0)
        while proc.poll() is None:
            self.sleep(0.2)
        return proc.returncode

    # ----------------------------------------------------------------------------- waiting

    def handle_signals(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is not None:
            self._hurry = True  # asked twice: do not wait for the rest of the grace period
        self._signal = signum

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop signal arrived or a long-lived command exited."""
        if self._signal is not None:
            raise Stopped(f"received {signal.Signals(self._signal).name}", 0)
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise Stopped(f"{name} exited with code {proc.returncode}", 1)
        self._reap_orphans()

    def sleep(self, seconds: float) -> None:
        """Sleep, checking for a stop every 0.2 s (:meth:`check`)."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    def supervise(self, start: Callable[[], object]) -> int:
        """Handle the stop signals, call ``start`` (it starts the commands, may wait with :meth:`sleep`
        and may raise :class:`Stopped`), wait for a stop, then stop every process. The exit code:
        0 after a stop signal, 1 if a command exited."""
        self.handle_signals()
        become_subreaper()
        exit_code = 0
        try:
            start()
            while True:
                self.sleep(3600)
        except Stopped as stop:
            self.say("supervisor", f"stopping every process: {stop}")
            exit_code = stop.exit_code
        finally:
            self.stop_all()
            self.say("supervisor", "stopped")
        return exit_code

    # ----------------------------------------------------------------------------- stopping

    def _reap_orphans(self) -> None:
        """Collect exited children this process adopted as subreaper (the Popen objects reap their own)."""
        own = {proc.pid for proc in self._popens}
        for pid, state in descendants(os.getpid()).items():
            if state == "Z" and pid not in own:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not our child: its own parent reaps it
                    pass

    def running(self, keep: Sequence[subprocess.Popen] = ()) -> list[int]:
        """The pids of every descendant still running (zombies excluded), except ``keep`` and theirs."""
        for proc in self._popens:
            proc.poll()
        self._reap_orphans()
        kept = {proc.pid for proc in keep if proc.returncode is None}
        for pid in list(kept):
            kept.update(descendants(pid))
        return [pid for pid, state in descendants(os.getpid()).items() if state != "Z" and pid not in kept]

    def _send(self, sig: int, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self) -> list[int]:
        """Stop every descendant, in two rounds (all but the ``stop_last`` commands, then those);
        the pids that needed SIGKILL."""
        return self._stop_round(keep=self._stop_last) + self._stop_round(keep=())

    def _stop_round(self, keep: Sequence[subprocess.Popen]) -> list[int]:
        """SIGTERM to every running descendant but ``keep`` and theirs (once each, also to those that
        appear meanwhile); SIGKILL to those still running after the grace period."""
        termed: set[int] = set()
        deadline = time.monotonic() + self.grace
        while (alive := self.running(keep)) and time.monotonic() < deadline and not self._hurry:
            new = [pid for pid in alive if pid not in termed]
            self._send(signal.SIGTERM, new)
            termed.update(new)
            time.sleep(0.2)
        if not alive:
            return []
        names = ", ".join(f"{pid} ({command_line(pid)})" for pid in alive)
        waited = "asked twice" if self._hurry else f"{self.grace:g} s"
        self.say("supervisor", f"still running after SIGTERM ({waited}), SIGKILL to: {names}")
        self._send(signal.SIGKILL, alive)
        deadline = time.monotonic() + 10  # SIGKILL cannot be ignored; bound the wait anyway
        while self.running(keep) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive
