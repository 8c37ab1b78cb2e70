"""A virtual environment per pip requirement set, layered over broker-serve's own
(docs/architecture.md, "Runtime environments").

`python -m venv --without-pip` makes it from broker-serve's interpreter, and a `.pth` file adds
broker-serve's environment after the new one's site-packages: what pip installs there wins, and
broker-serve with its dependencies is shared, not installed again. The requirements are installed
by broker-serve's own pip, run by the new interpreter (so into the new environment), which reads
the host's pip configuration as any pip does. `.ready`, written last, marks an environment
complete; one without it is half-built and is built again.
"""

from __future__ import annotations

import collections
import os
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..exceptions import RuntimeEnvError
from .archives import remove_tree
from .cache import VENVS, HostCache

READY = ".ready"
# The installs running in this process, so that a stopping worker node or controller ends
# them rather than wait for them (`stop_installs`).
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()
_stopping = threading.Event()
_LAYER_FILE = "_broker_serve_base.pth"
_ERROR_TAIL = 30  # lines of pip's output in an error
_PROGRESS_EVERY_S = 1.0


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def base_site_dirs() -> list[str]:
    """broker-serve's environment: where the new one finds everything it does not install."""
    dirs = [path for path in site.getsitepackages() if os.path.isdir(path)]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user and os.path.isdir(user):
        dirs.append(user)
    return dirs


def ensure(cache: HostCache, digest: str, packages: list[str], install_options: list[str],
           pip_check: bool, timeout_s: float, progress: Callable[[str], None]) -> Path:
    """The interpreter of the environment for these requirements, built if this host has
    none. Blocking: call it off the event loop."""
    with cache.locked(VENVS, digest) as venv:
        if (venv / READY).exists():
            return python_of(venv)
        remove_tree(venv)  # a half-built one, from a process that died
        try:
            _build(venv, packages, install_options, pip_check, timeout_s, progress)
        except BaseException:
            remove_tree(venv)
            raise
        (venv / READY).write_text(f"{time.time()}\n")
        return python_of(venv)


def stop_installs() -> None:
    """End the installs running in this process and refuse new ones: a worker node or a
    controller that stops must not wait for pip. Their environments are removed, not marked
    ready, so the next process builds them again."""
    with _running_lock:
        _stopping.set()
        for process in _running:
            process.kill()


def _build(venv: Path, packages: list[str], install_options: list[str], pip_check: bool,
           timeout_s: float, progress: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    progress(f"creating a virtual environment for {len(packages)} pip requirement(s)")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], deadline,
         "creating the virtual environment", progress=None)
    python = python_of(venv)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    try:
        purelib = subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                                 check=True, timeout=60).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise RuntimeEnvError(f"the new virtual environment's interpreter failed: {exc}"
                              ) from None
    # Lines starting with `import` run at startup: addsitedir also reads the .pth files there
    # (an editable install's, for one), which a plain path line would not.
    layer = "".join(f"import site; site.addsitedir({path!r})\n" for path in base_site_dirs())
    Path(purelib, _LAYER_FILE).write_text(layer)
    requirements = venv / "requirements.txt"
    requirements.write_text("".join(f"{line}\n" for line in packages))
    summary = f"installing {len(packages)} pip requirement(s)"
    progress(summary)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
          "--progress-bar", "off", *install_options, "-r", str(requirements)], deadline,
         "pip install", progress=lambda line: progress(f"{summary}: {line}"))
    if pip_check:
        _run([str(python), "-m", "pip", "check"], deadline, "pip check", progress=None)


def _run(command: list[str], deadline: float, what: str,
         progress: Callable[[str], None] | None) -> None:
    """Run `command`, passing its latest output line to `progress` at most once a second;
    RuntimeEnvError with the tail of its output if it fails or outlives `deadline`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)  # the user's working_dir must not shadow pip itself
    with _running_lock:
        if _stopping.is_set():
            raise RuntimeEnvError(f"{what} was not started: this process is stopping")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env)
        _running.add(process)
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=_ERROR_TAIL)
    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), process.kill)
    timer.start()
    shown = 0.0
    try:
        for line in process.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if progress is not None and time.monotonic() - shown >= _PROGRESS_EVERY_S:
                shown = time.monotonic()
                progress(line.strip()[:200])
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        with _running_lock:
            _running.discard(process)
    output = "\n".join(tail)
    if _stopping.is_set() and code != 0:
        raise RuntimeEnvError(f"{what} was stopped: this process is stopping")
    if time.monotonic() >= deadline and code != 0:
        raise RuntimeEnvError(f"{what} did not finish within the runtime_env's setup timeout "
                              f"(config.setup_timeout_seconds):\n{output}")
    if code != 0:
        raise RuntimeEnvError(f"{what} failed (exit code {code}):\n{output}")
