"""Ray's side of the console (ctal.console): its chatter off unless ``--verbose``, our lines through.

Without ``--verbose`` (``ctal.console.verbose()`` false):

- ``ray.init(log_to_driver=False)``: nothing that Ray's worker processes print reaches the console
  (Train controller and worker logs, the placement-group cleaner, per-report checkpoint lines,
  trial output). What we want from workers comes to the driver by other means: pretraining's rank 0
  sends its log lines through a ``LogRelay`` (the driver prints them and moves the step bar), a
  sweep's trials report to Tune, whose callback on the driver prints one line per trial. Errors
  still come back as the exceptions ``fit()`` raises, with the worker's traceback.
- The driver's ``ray`` loggers show warnings and errors only; Ray Data's progress bars are off (ours
  count rows instead); Tune runs at ``verbose=0`` with its legacy output (``RAY_AIR_NEW_OUTPUT=0``:
  the new one prints its experiment box at any verbosity), a bar over trials in place of its tables.
- While Ray Data runs (preprocessing), the one ERROR line Ray's C++ core worker prints about Ray
  Data's actor constructor arguments is dropped from the console (``dropping_stderr_lines``); every
  other line of file descriptor 2 passes.

With ``--verbose`` all of it is back, as Ray prints it by default.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..console import verbose

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def quiet_driver() -> None:
    """Hide Ray's driver-side INFO logs and Ray Data's progress bars (no-op when verbose)."""
    if verbose():
        return
    import ray.data

    # Tune's new output engine prints its experiment box even at verbose=0; the legacy one is silent
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in RAY_LOGGERS:  # ray.data configures its own logger at import: set each one
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)  # "... may be a performance bottleneck"
    # "Failed to fetch metrics for N trial(s)" and a traceback per trial when a rerun restores trials
    # that never reported: our results table says which trials have no result, and why
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # "Token authentication is enabled for this Ray cluster": a local Ray's default since 2.59, kept on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def init_ray(address: Optional[str] = None, **kwargs) -> None:
    """``ray.init(address, **kwargs)`` with the console set up; no-op when Ray is already up
    (a caller that started it chose its own console). Without an address (argument or RAY_ADDRESS)
    it starts a local Ray that listens on the loopback interface only (``loopback_node``)."""
    quiet_driver()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    with (contextlib.nullcontext() if address else loopback_node()):
        ray.init(address=address or "local", log_to_driver=verbose(),
                 logging_level=logging.INFO if verbose() else logging.WARNING, **kwargs)


@contextlib.contextmanager
def loopback_node():
    """While a local Ray starts: its node IP is 127.0.0.1, so the GCS, raylet, workers and agents bind
    the loopback interface, not every interface, and Ray Train's MASTER_ADDR is 127.0.0.1 (where
    ``torch_backend`` binds torch's rank-0 store server too).
    ``ray.init(_node_ip_address="127.0.0.1")`` cannot do it on Linux (Ray swaps a loopback address
    for the machine's); Ray's single-machine mode (its default on macOS and Windows) does. Restored
    afterwards: once started, Ray takes the node IP from the running node."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


# Ray 2.60's core worker logs this at ERROR level, once per process, for every Ray Data actor pool:
# Ray Data hands its MapWorker actors their constructor arguments (the map function, the DataContext)
# as object references and asks for restarts (ray-project/ray#57733, #53727). Ours are owned by the
# driver and live until the data set is written, so a restart finds them; nothing to act on. Ray's
# options cannot avoid it (max_restarts=0 would give up Ray Data's actor restarts after a worker dies)
# and its only threshold, RAY_BACKEND_LOG_LEVEL, would hide every C++ error with it. The line stays in
# the driver's log (python-core-driver-*.log in the Ray session's logs) and on --verbose consoles.
RAY_DATA_ACTOR_ARGS = ("core_worker.cc", "MapWorker(", "has constructor arguments in the object store")


@contextlib.contextmanager
def dropping_stderr_lines(needles: tuple[str, ...] = RAY_DATA_ACTOR_ARGS):
    """While the block runs, file descriptor 2 (where Ray's C++ code logs, and Python's stderr) goes
    through a filter that drops each whole line holding every one of ``needles`` and passes everything
    else on unchanged and at once (a partial line too, unless it may be the start of a C++ log line,
    ``[<digit>...``: that waits for its newline). No-op when verbose."""
    if verbose():
        yield
        return
    wanted = [n.encode() for n in needles]
    c_log_start = re.compile(rb"\[(\d|$)")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def send(data: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed console must not block the writers
            while data:
                data = data[os.write(saved, data):]

    def pump() -> None:
        held = b""
        while chunk := os.read(read_end, 1 << 16):
            data, held = held + chunk, b""
            try:
                *lines, held = data.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not all(w in line for w in wanted))
                if held and not c_log_start.match(held):
                    out, held = out + held, b""
            except Exception:  # never stop reading: a full pipe would block every writer
                out, held = data, b""
            send(out)
        send(held)

    thread = threading.Thread(target=pump, name="ctal-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # fd 2 back; the pipe's last writer gone, the pump drains it and ends
        thread.join(timeout=5)  # a child process that inherited the pipe keeps it open: do not wait on it
        if not thread.is_alive():
            os.close(read_end)
            os.close(saved)


def tune_verbosity(requested: int) -> int:
    """Tune's ``RunConfig(verbose=...)``: what the sweep config asks for when verbose, else 0."""
    return requested if verbose() else 0


@ray.remote(num_cpus=0)
class _LogSink:
    """Holds lines from workers until the driver collects them (needs no CPU: workers hold them).
    Placed on the driver's node (``LogRelay``): anywhere else, losing that node would end a run
    that Ray Train could otherwise restore from its latest checkpoint."""

    def __init__(self):
        self._lines: list[str] = []

    def put(self, line: str) -> None:
        self._lines.append(line)

    def take(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines


class LogRelay:
    """Worker log lines, printed by the driver. ``with LogRelay(handle) as relay:`` the driver hands
    each line that a worker sends with ``relay.sender()`` (picklable: pass it to the workers) to
    ``handle``, about once a second, and what is left when the block ends."""

    POLL_S = 1.0

    def __init__(self, handle: Callable[[str], None]):
        self._handle = handle
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._sink = _LogSink.options(scheduling_strategy=here).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctal-log-relay", daemon=True)

    def sender(self) -> Callable[[str], None]:
        return _Sender(self._sink)

    def _drain(self) -> None:
        for line in ray.get(self._sink.take.remote()):
            self._handle(line)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                self._drain()
            except Exception:  # a slow answer must not end the run; the final drain gets the rest
                pass

    def __enter__(self) -> "LogRelay":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._drain()
        except Exception:
            if exc_type is None:
                raise
            # the block's own error is the one to see, not a relay that went down with it
        finally:
            ray.kill(self._sink)


class _Sender:
    def __init__(self, sink):
        self._sink = sink

    def __call__(self, line: str) -> None:
        try:
            ray.get(self._sink.put.remote(line))  # in order, and delivered before the worker moves on
        except Exception:  # logging must not end a run: the line goes to the worker's own log
            print(line, flush=True)
