"""`__del__`, as Ray calls it: a deployment instance's when its replica stops gracefully, and an
evicted multiplexed model's, plain or `async def`, exactly once (the interpreter's own call is
skipped), within the graceful shutdown timeout."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest

from broker_serve import serve
from broker_serve.replica import destructor, multiplex

from .lifecycle_marks import events, exited, note
from .waiting import wait_for


def deployment_with_del(marks: str, asynchronous: bool) -> Any:
    if asynchronous:
        @serve.deployment
        class Service:
            def __init__(self) -> None:
                note(marks, "init")

            def __call__(self) -> int:
                return os.getpid()

            async def __del__(self) -> None:
                await asyncio.sleep(0)
                note(marks, "del")
    else:
        @serve.deployment
        class Service:  # type: ignore[no-redef]
            def __init__(self) -> None:
                note(marks, "init")

            def __call__(self) -> int:
                return os.getpid()

            def __del__(self) -> None:
                note(marks, "del")

    return Service


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_del_is_called_once_when_the_replica_is_deleted(cluster, tmp_path, asynchronous):
    handle = serve.run(deployment_with_del(str(tmp_path), asynchronous).bind())
    pid = handle.remote().result(timeout_s=30)
    serve.delete("default")
    wait_for(lambda: exited(pid))
    assert events(tmp_path) == {pid: ["init", "del"]}


def test_an_async_del_that_never_returns_is_cancelled_at_the_graceful_timeout(cluster,
                                                                              tmp_path):
    marks = str(tmp_path)

    @serve.deployment(graceful_shutdown_timeout_s=1)
    class Stuck:
        def __call__(self) -> int:
            return os.getpid()

        async def __del__(self) -> None:  # Ray's own test of this: it loops forever
            note(marks, "del")
            try:
                while True:
                    await asyncio.sleep(0.05)
            finally:
                note(marks, "cancelled")

    pid = serve.run(Stuck.bind()).remote().result(timeout_s=30)
    serve.delete("default")
    wait_for(lambda: exited(pid))
    # Cancelled by the replica: a SIGKILL from the node would not have run the `finally`.
    assert events(tmp_path) == {pid: ["del", "cancelled"]}


def model_server(marks: str, asynchronous: bool) -> Any:
    class Model:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        async def cleanup(self) -> None:
            note(marks, f"cleanup-{self.model_id}")

    if asynchronous:
        class Loaded(Model):
            async def __del__(self) -> None:
                await asyncio.sleep(0)
                note(marks, f"del-{self.model_id}")
    else:
        class Loaded(Model):  # type: ignore[no-redef]
            def __del__(self) -> None:
                note(marks, f"del-{self.model_id}")

    @serve.deployment
    class Server:
        @serve.multiplexed(max_num_models_per_replica=1)
        async def get_model(self, model_id: str) -> Loaded:
            note(marks, f"load-{model_id}")
            return Loaded(model_id)

        async def __call__(self) -> int:
            model = await self.get_model(serve.get_multiplexed_model_id())
            del model
            gc.collect()  # whatever the interpreter would call on the evicted one, now
            return os.getpid()

    return Server


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_evicted_models_del_is_called_once_in_a_replica(cluster, tmp_path, asynchronous):
    handle = serve.run(model_server(str(tmp_path), asynchronous).bind())
    for model_id in ("m1", "m2", "m3"):
        pid = handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=30)
    assert events(tmp_path) == {pid: ["load-m1", "load-m2", "cleanup-m1", "del-m1",
                                      "load-m3", "cleanup-m2", "del-m2"]}
    serve.delete("default")
    wait_for(lambda: exited(pid))
    # The model still held is unloaded as the replica stops.
    assert events(tmp_path)[pid][-2:] == ["cleanup-m3", "del-m3"]
    assert len(events(tmp_path)[pid]) == 9


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_evicted_model_is_freed_after_its_one_del(asynchronous):
    deleted: list[str] = []

    class Model:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id
            self.me = self  # a cycle: freed by the collector, not by reference counting

    if asynchronous:
        class Loaded(Model):
            async def __del__(self) -> None:
                await asyncio.sleep(0)
                deleted.append(self.model_id)
    else:
        class Loaded(Model):  # type: ignore[no-redef]
            def __del__(self) -> None:
                deleted.append(self.model_id)

    refs: list[weakref.ref[Loaded]] = []

    @serve.multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> Loaded:
        model = Loaded(model_id)
        refs.append(weakref.ref(model))
        return model

    async def scenario() -> None:
        await load("a")
        await load("b")  # evicts "a"
        await load("c")  # evicts "b"
        gc.collect()
        assert deleted == ["a", "b"]
        assert [ref() is None for ref in refs] == [True, True, False]  # evicted ones are freed
        await multiplex.unload_all()  # as a stopping replica does

    asyncio.run(scenario())
    gc.collect()
    assert deleted == ["a", "b", "c"]
    assert all(ref() is None for ref in refs)
    if not asynchronous:  # (the interpreter never awaits an async one)
        other = Loaded("not evicted")
        del other
        gc.collect()  # the interpreter still calls __del__ of the objects it was not called for
        assert deleted == ["a", "b", "c", "not evicted"]


def test_the_interpreter_does_not_call_del_again_at_exit_and_atexit_still_runs(tmp_path):
    """The instance stays referenced until the process exits, as a replica's does."""
    script = textwrap.dedent("""
        import asyncio, atexit, logging, sys
        from broker_serve.replica import destructor, multiplex

        logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
        log = logging.getLogger("user")

        class Service:
            def __del__(self):
                print("del", flush=True)

        class Inherits(Service):
            pass

        kept = [Service(), Inherits()]
        asyncio.run(destructor.call_del(kept[0]))
        asyncio.run(destructor.call_del(kept[1]))
        atexit.register(lambda: log.info("atexit ran"))
        log.info("exiting")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(destructor.__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["del", "del", "exiting", "atexit ran", ""]
    assert done.stderr == ""
