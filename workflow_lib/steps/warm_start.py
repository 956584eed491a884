"""Warm start: local jobs forked from a process that has imported the library once.

Every Snakemake job is a fresh interpreter, and before its step begins it imports
numpy, scipy, astropy, pandas, sep and the library: 1-1.5 s of CPU per job, as
much as the work itself on a 1-Mpix CCD, paid again by each of a run's hundreds
of jobs. So a local run keeps one *worker server* per machine, interpreter and
code version: it imports everything once, listens on a Unix socket, and forks a
child per job. The job's own process (Snakemake's script, ``scripts/run_step.py``)
sends the child its job, working directory, environment and standard streams,
forwards signals to it and exits with its status; a child whose job process dies
kills itself, as the job would have died with it. Forked children share nothing
but the state of the freshly imported library, so a job runs exactly as it would
in a process of its own.

The first job finds no server: it starts one in the background and runs cold,
as do the jobs that come before the server is ready. The server leaves after
``IDLE_S`` without a job. A change to the library's source or to the
interpreter's installed packages names a new socket, so an edited library is
never served stale. ``DC2_WARM_START=0`` turns it off, ``=1`` forces it on;
by default it is on except inside a SLURM allocation (where each job is a
separate allocation whose processes end with it) and for jobs with more than
one thread (the server's numerical libraries are loaded single-threaded).

What the job process's own resource use shows, e.g. Snakemake's benchmark
files, is the waiting process only; the job's log gives the step's CPU time
and peak memory (``benchmarks.rule_costs`` adds them).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import logging
import os
import pickle
import pkgutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from workflow_lib.steps.runner import Job, run_job

SWITCH = "DC2_WARM_START"
IDLE_S = 120.0
# Third-party modules the steps import inside functions (the library's own
# modules are all imported by walking its packages).
LAZY_IMPORTS = (
    "astroscrappy",
    "astropy.stats",
    "astropy.units",
    "galsim",
    "jsonschema",
    "reproject",
    "scipy.ndimage",
    "scipy.optimize",
    "scipy.spatial",
    "sep",
    "yaml",
)
PACKAGES = (
    *("core", "io", "single_frame", "static_sky", "objects", "diffim", "association"),
    *("sim", "qa", "steps"),
)
# The server must have one thread when it forks: its numerical libraries are
# loaded with one thread each, as a job of one thread loads them (runner.run_job
# sets OMP_NUM_THREADS from the threads), and pyarrow's bundled jemalloc without
# its background purging thread.
SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}
_LENGTH = struct.Struct("!Q")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

log = logging.getLogger(__name__)


def enabled(job: Job) -> bool:
    """Whether this job should run in a warm worker (see the module docstring)."""
    setting = os.environ.get(SWITCH, "").strip()
    if setting == "0":
        return False
    if not hasattr(socket, "send_fds") or job.threads != 1:
        return False
    return setting == "1" or "SLURM_JOB_ID" not in os.environ


def code_signature() -> str:
    """The interpreter, the installed packages and the library's source files: a
    server started from other code is never asked to run a job. And the hash seed,
    which is fixed when an interpreter starts: a job asking for another one (e.g.
    the tests that vary it) gets a server of its own."""
    digest = hashlib.sha256(sys.executable.encode())
    digest.update(os.environ.get("PYTHONHASHSEED", "random").encode())
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        digest.update(f"{site}:{os.stat(site).st_mtime_ns}".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()[:24]


def socket_path() -> Path | None:
    """This user's socket for this code, or None where no private directory can be had.

    The directory is ``$DC2_WARM_START_DIR`` or the system's temporary directory.
    """
    base = os.environ.get("DC2_WARM_START_DIR") or tempfile.gettempdir()
    directory = Path(base) / f"dc2-drp-warm-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stat = directory.stat()
    except OSError:
        return None
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        return None  # someone else's, or open to others: not ours to trust
    path = directory / f"{code_signature()}.sock"
    return path if len(str(path)) < 100 else None  # AF_UNIX paths are short


# ------------------------------------------------------------------ the job's side


def run_in_worker(job: Job, *, startup_s: float) -> int | None:
    """Run ``job`` in a child of the warm worker; its exit status, or None when no
    worker took the job (the caller runs it itself). Starts a worker if none is up."""
    if not enabled(job):
        return None
    path = socket_path()
    if path is None:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        start_server(path)
        return None
    with connection:
        return _hand_over(connection, job, startup_s)


def _hand_over(connection: socket.socket, job: Job, startup_s: float) -> int | None:
    request = pickle.dumps(
        {"job": job, "cwd": os.getcwd(), "env": dict(os.environ), "startup_s": startup_s}
    )
    try:
        socket.send_fds(connection, [_LENGTH.pack(len(request))], [0, 1, 2])
        connection.sendall(request)
        replies = connection.makefile("rb")
        kind, child_pid = pickle.load(replies)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None  # the server was leaving: nothing ran, so run it here
    if kind != "pid":
        return None
    forwarded: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(signum)
        try:
            os.kill(child_pid, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    try:
        kind, exit_code = pickle.load(replies)
    except (OSError, EOFError, pickle.UnpicklingError):
        # Killed before it could say: as a job killed by that signal would end.
        sys.stderr.write(f"warm-start worker {child_pid} ended without an exit status\n")
        exit_code = 128 + forwarded[-1] if forwarded else 1
    return int(exit_code)


def start_server(path: Path) -> None:
    """Start a server for ``path`` in the background, detached from this job (its own
    session, no standard streams of ours), unless one is starting already."""
    lock = _try_lock(path)
    if lock is None:
        return  # a server holds it: it is still importing, or leaving
    os.close(lock)  # the server takes it for its lifetime
    log_path = path.with_suffix(".log")
    with open(log_path, "ab") as server_log:
        subprocess.Popen(
            [sys.executable, "-m", "workflow_lib.steps.warm_start", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=server_log,
            stderr=server_log,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,
        )


def _try_lock(path: Path) -> int | None:
    descriptor = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


# --------------------------------------------------------------- the server's side


def preload() -> None:
    """Import every module a step may need, so that no child imports anything."""
    root = importlib.import_module("workflow_lib")
    for package_name in PACKAGES:
        package = importlib.import_module(f"{root.__name__}.{package_name}")
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    for name in LAZY_IMPORTS:
        importlib.import_module(name)


def native_thread_count(settle_s: float = 1.0) -> int:
    """Threads of this process (a fork copies only the calling one), once the
    short-lived ones some imports start have ended (waiting up to ``settle_s``)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            count = len(os.listdir("/proc/self/task"))
        except OSError:
            return threading.active_count()
        if count == 1 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def serve(path: Path, idle_s: float = IDLE_S) -> None:
    """Preload, listen on ``path`` and fork a child per job until ``idle_s`` without one."""
    if path.stem != code_signature():
        # Started for other code than this interpreter imports (another checkout).
        log.error("warm-start server not started: %s is not this code's socket", path)
        return
    lock = _try_lock(path)
    if lock is None:
        return  # another server has it
    start = time.perf_counter()
    preload()
    threads = native_thread_count()
    if threads != 1:
        # Forking a process with other threads can copy a lock that one of them holds.
        log.error("warm-start server not started: %d threads after the imports", threads)
        return
    path.unlink(missing_ok=True)  # a dead server's socket (we hold the lock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(idle_s)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    ready_s = time.perf_counter() - start
    print(f"warm-start server {os.getpid()} ready in {ready_s:.1f} s", flush=True)
    served = 0
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                break
            served += 1
            if os.fork() == 0:
                listener.close()
                os.close(lock)  # the lock is the server's alone, not its children's
                _run_child(connection)
            connection.close()
    finally:
        path.unlink(missing_ok=True)
        listener.close()
        print(f"warm-start server {os.getpid()} leaves after {served} jobs", flush=True)


def _receive(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _LENGTH.size, 3)
    (length,) = _LENGTH.unpack(header)
    payload = bytearray()
    while len(payload) < length:
        chunk = connection.recv(length - len(payload))
        if not chunk:
            raise EOFError("the job process left before sending its job")
        payload += chunk
    return pickle.loads(payload), fds


def _run_child(connection: socket.socket) -> None:
    """In the forked child: become the job's process, run its step, report, exit."""
    exit_code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a step's subprocesses must be waited on
        signal.signal(signal.SIGINT, signal.default_int_handler)
        connection.settimeout(30.0)
        request, fds = _receive(connection)
        connection.settimeout(None)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        connection.sendall(pickle.dumps(("pid", os.getpid())))
        threading.Thread(target=_die_with_the_job, args=(connection,), daemon=True).start()
        try:
            run_job(request["job"], startup_s=request["startup_s"], forked_from=os.getppid())
            exit_code = 0
        except SystemExit as stop:
            exit_code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()  # to the job's stderr, as an uncaught exception would
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        connection.sendall(pickle.dumps(("exit", exit_code)))
    finally:
        os._exit(exit_code)


def _die_with_the_job(connection: socket.socket) -> None:
    """The job process sends nothing more: the connection's end means it is gone."""
    try:
        while connection.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(Path(sys.argv[1]), *(float(arg) for arg in sys.argv[2:3]))
