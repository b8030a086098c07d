"""``llm-worker run --processes N``: import litellm once, then fork N workers that share its pages.

The supervisor pays the expensive part of a start-up once: litellm's import and the model config
and its check. It makes no Router and calls no model, not even a mock: litellm's Rust router core
starts threads that do not survive a fork, so the supervisor reserves itself for forking
(litellm's own guard, as for gunicorn's preload) and each child warms up on its own. Before
forking it freezes the heap (``gc.freeze``), so that no collection in a child writes to the
shared pages. Each child is an ordinary worker: its own consumer name, heartbeat, Redis
connections and event loop, all made after the fork, none inherited.

The supervisor restarts a child that dies, and forwards SIGTERM and SIGINT (the first drains,
the second leaves in-flight jobs to other workers, as for a single worker). Children that keep
dying soon after they start (a refused password, a broken provider library) are not restarted
forever: after ``MAX_QUICK_DEATHS`` in a row the supervisor stops and exits non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Final

import structlog

from llm_pool_worker.backoff import Backoff

log = structlog.get_logger(__name__)

MIN_UPTIME_S: Final = 10.0  # a child that dies sooner died of its start-up
MAX_QUICK_DEATHS: Final = 5  # in a row, across children: give up
KILL_MARGIN_S: Final = 15.0  # past the children's own grace, the supervisor kills what is left
PR_SET_PDEATHSIG: Final = 1


class ForkUnsafe(RuntimeError):
    """The supervisor cannot fork workers safely."""


@dataclass
class Child:
    index: int
    process: BaseProcess
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Keeps ``count`` children of ``serve_child`` alive until a signal, then waits for them."""

    def __init__(self, count: int, serve_child: Callable[[int], None], grace_s: float) -> None:
        self.count = count
        self.serve_child = serve_child
        self.grace_s = grace_s
        self.children: dict[int, Child] = {}
        self.signals = 0
        self.quick_deaths = 0
        self.backoff = Backoff(first_s=0.5, cap_s=30.0)
        self.restart_at: dict[int, float] = {}
        self._context = multiprocessing.get_context("fork")
        self._wake_r, self._wake_w = os.pipe()

    def run(self) -> int:
        """Serve until signalled; 0 after a clean stop, 1 when children kept dying at start-up."""
        os.set_blocking(self._wake_w, False)
        previous_fd = signal.set_wakeup_fd(self._wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("forking workers", processes=self.count)
            for index in range(self.count):
                self._start(index)
            log.info("supervisor ready", processes=self.count, pids=[c.process.pid for c in self.children.values()])
            code = self._watch()
            self._wait_for_children()
            return code
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(child.process.pid, signal.SIGTERM)  # type: ignore[arg-type]

    def _watch(self) -> int:
        """Restart children that die, until a signal comes or they keep dying at start-up."""
        while not self.signals:
            now = time.monotonic()
            for index, when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[index]
                    self._start(index)
            timeout = min([*self.restart_at.values(), now + 1.0]) - now
            self._wait([c.process.sentinel for c in self.children.values()], max(0.0, timeout))
            for child in [c for c in self.children.values() if not c.process.is_alive()]:
                if self.signals:
                    break
                if self._died(child):
                    self._signal_children()
                    return 1
        return 0

    def _died(self, child: Child) -> bool:
        """Note a death and plan the restart; True when it is one quick death too many."""
        del self.children[child.index]
        child.process.join()
        uptime = time.monotonic() - child.started
        quick = uptime < MIN_UPTIME_S
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if not quick:
            self.backoff.reset()
        log.warning("worker process died", pid=child.process.pid, exitcode=child.process.exitcode, uptime_s=round(uptime, 1),
                    quick_deaths=self.quick_deaths)
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.critical("worker processes keep dying at start-up; giving up", deaths=self.quick_deaths)
            return True
        self.restart_at[child.index] = time.monotonic() + (self.backoff.next_delay() if quick else 0.0)
        return False

    def _signal_children(self) -> None:
        self._on_signal(signal.SIGTERM, None)

    def _wait(self, sentinels: list[int], timeout: float) -> None:
        ready = multiprocessing.connection.wait([*sentinels, self._wake_r], timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)

    def _wait_for_children(self) -> None:
        """Every child drains within its grace period; what is left after it, and a margin, is killed."""
        deadline = time.monotonic() + self.grace_s + KILL_MARGIN_S
        for child in list(self.children.values()):
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("worker process did not stop in time; killing it", pid=child.process.pid)
                child.process.kill()
                child.process.join()
        log.info("supervisor stopped", exitcodes={c.process.pid: c.process.exitcode for c in self.children.values()})

    def _start(self, index: int) -> None:
        process = self._context.Process(target=self._child_main, args=(index,), name=f"llm-worker-{index}", daemon=False)
        process.start()
        self.children[index] = Child(index, process)
        if self.signals and process.pid is not None:  # a stop that came while children were being started
            os.kill(process.pid, signal.SIGTERM)

    def _child_main(self, index: int) -> None:
        """In the child: forget the supervisor's signal plumbing, die with it, then serve."""
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which forwards it once
        die_with_parent()
        self.serve_child(index)


def reserve_for_forking() -> None:
    """Freeze what is loaded so far, and make sure nothing in this process starts litellm's native
    runtime (whose threads a fork would lose). A litellm without the Rust core needs no reserving."""
    import gc

    try:
        from litellm.rust_bridge.fork_guard import NativeStateStartedBeforeFork, reserve_process_for_forking
    except ImportError:
        log.debug("this litellm has no native runtime to reserve")
    else:
        try:
            reserve_process_for_forking("the llm-worker supervisor")
        except NativeStateStartedBeforeFork:
            raise ForkUnsafe("litellm started its native runtime before the fork, which its threads would not survive;"
                             " run one process per worker instead of --processes") from None
    gc.collect()
    gc.freeze()


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM (a drain) if the supervisor dies, so that no worker outlives it unseen."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
