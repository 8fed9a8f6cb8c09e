"""The demo's child processes: one ``fedsilo-coordinator serve`` and N ``fedsilo-silo run``.

Every child is a real console-script process started in its own session (so a Ctrl-C
on the terminal reaches only the demo, which then stops them in order) with its
output in ``OUT/logs``. On Linux each child is also asked to receive SIGTERM if the
demo dies without cleaning up (``PR_SET_PDEATHSIG``), so even a SIGKILLed demo leaves
nothing running (the coordinator then stops gracefully, and the silos stop retrying).
:class:`Children` stops whatever is still alive on every exit path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["Child", "Children", "DemoError", "child_env", "command", "free_port", "loopback_without_proxy",
           "signals_deferred", "wait_healthy"]


class DemoError(Exception):
    """The demo cannot go on; the message says what failed and where its log is."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script: str, module: str) -> list[str]:
    """The console script beside this interpreter, or ``python -m module`` without one."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def loopback_without_proxy(env: MutableMapping[str, str]) -> None:
    """Everything talks to 127.0.0.1: never through a proxy configured for the outside world."""
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: ours, minus settings that would change the demo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_SILO_")}
    loopback_without_proxy(env)
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, in the parent: the child, between fork and exec, only calls it
# (loading a library there could deadlock on a lock another thread held at fork time).
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _preexec() -> Callable[[], None] | None:
    return _die_with_parent if _PRCTL is not None else None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them as usual.

    A child started inside is registered before the interrupt stops everything
    registered: without this, a Ctrl-C landing between ``Popen`` returning and the child
    being recorded left that child running after the demo had exited. Python-level (the
    handlers, not the thread's signal mask), so it holds whichever thread the kernel
    delivers to; it does nothing outside the main thread, where handlers cannot be set.
    """
    try:
        held: list[int] = []
        previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # now handled by the restored handler


@dataclass
class Child:
    """One child process with its log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def last_line(self) -> str:
        """The last non-empty line of the log (a silo prints why it stopped there)."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


class Children:
    """Starts children and guarantees they are stopped: ``with Children() as kids: ...``."""

    def __init__(self) -> None:
        self._all: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()

    def start(self, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str]) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        with signals_deferred():  # an interrupt now finds the child registered, and stops it
            try:
                process = subprocess.Popen(
                    list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                    start_new_session=True, preexec_fn=_preexec(),
                )
            except BaseException:
                log.close()
                raise
            child = Child(name, process, log_path, log)
            self._all.append(child)
        return child

    def stop(self, children: Sequence[Child], *, grace: float = 30.0) -> None:
        """SIGTERM (a silo finishes its current step), then SIGKILL after ``grace`` seconds."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in children:
            child.signal(signal.SIGKILL)  # the whole group: nothing it started survives
            try:
                child.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            child.close_log()

    def stop_all(self) -> None:
        alive = [c for c in self._all if c.process.poll() is None]
        # Silos first, so none of them is left retrying against a coordinator that went away.
        self.stop([c for c in alive if c.name != "coordinator"], grace=10.0)
        self.stop([c for c in alive if c.name == "coordinator"], grace=10.0)
        for child in self._all:
            child.close_log()


class ProcessExited(Exception):
    """The process being waited for exited first (``returncode``)."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"exited with {returncode}")
        self.returncode = returncode


def await_healthz(process: subprocess.Popen, base_url: str, timeout: float, *, interval: float = 0.2) -> None:
    """Poll ``base_url/healthz`` until it answers 200.

    Raises ProcessExited if ``process`` exits first, TimeoutError after ``timeout`` s.
    Shared by the demo and the tests, which say in their own words what went wrong.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ProcessExited(process.returncode)
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(interval)
    raise TimeoutError(f"no healthy answer from {base_url} within {timeout:.0f} s")


def wait_healthy(child: Child, base_url: str, timeout: float = 90.0) -> None:
    """Wait until the coordinator answers ``/healthz``; DemoError if it exits or never does."""
    try:
        await_healthz(child.process, base_url, timeout)
    except ProcessExited as exc:
        raise DemoError(f"the coordinator exited with {exc.returncode}; see {child.log_path}") from None
    except TimeoutError:
        raise DemoError(f"the coordinator did not answer within {timeout:.0f} s; see {child.log_path}") from None
