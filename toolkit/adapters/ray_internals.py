"""Ray internals the toolkit uses (Ray 2.60), each because no public API does the job.

* The actors of this job, dead ones included, with their state, end time, pid and node: the public
  state API (`ray.util.state.list_actors`) asks the dashboard's HTTP server, which the toolkit's own
  Ray (include_dashboard=False) and many clusters do not run ("Failed to connect to API server").
  `ray._private.state.actors` (a DeveloperAPI) reads the same table from the GCS directly. The
  pipeline waits on it before a training launch (toolkit.gradual.processes.release_ray).
"""
from __future__ import annotations

import inspect

from . import AdapterCheck, installed_version

LIBRARY = "ray"
# the fields of an actor's entry that job_actors' callers read
ACTOR_FIELDS = ("State", "EndTime", "Pid", "Address", "ActorClassName")


def job_actors(job_id) -> dict[str, dict]:
    """Actor id -> its entry (ACTOR_FIELDS among others) for every actor of `job_id` (a ray.JobID)
    the GCS remembers, alive or dead."""
    import ray._private.state

    return ray._private.state.actors(job_id=job_id)


def check() -> AdapterCheck:
    version = installed_version(LIBRARY)
    if version is None:
        return AdapterCheck(LIBRARY, None)
    try:
        import ray._private.state as state
    except ImportError:
        return AdapterCheck(LIBRARY, version, ("ray._private.state",))
    actors = getattr(state, "actors", None)
    if actors is None:
        return AdapterCheck(LIBRARY, version, ("ray._private.state.actors",))
    if "job_id" not in inspect.signature(actors).parameters:
        return AdapterCheck(LIBRARY, version, ("ray._private.state.actors(job_id=...)",))
    # the entry's fields are those GlobalState._gen_actor_info writes
    source = inspect.getsource(state.GlobalState)
    missing = tuple(f"actor entry field {name!r}" for name in ACTOR_FIELDS if f'"{name}"' not in source)
    return AdapterCheck(LIBRARY, version, missing)
