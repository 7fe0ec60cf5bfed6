"""Ray Train's placement-group cleaner, made to act only on a controller death the GCS confirms.

Ray 2.60's Train controller starts a detached ``PlacementGroupCleaner`` that asks the State API
(the dashboard's HTTP server) every second whether the controller is alive and removes the worker
group's placement group when it is not. ``is_actor_alive`` counts a missing answer as death: when
the dashboard is slow (a busy machine), absent (``include_dashboard=False``) or another cluster's
(several local Ray instances on one box: the State API client then fails to pick one), the cleaner
can remove the placement group of a live run, and its workers die ("Destroying worker since its
placement group was removed"; ray-project/ray PR 65447 is open). No environment variable or config
switches the cleaner off or changes its test, so ``steady_trainer`` swaps it, for our trainers
only, for one that asks the GCS directly (the worker's own connection, no dashboard) and removes the
placement group only when the GCS says the controller is DEAD (or no longer knows it). Without an
answer it keeps waiting, as Ray's does on a State API error. Checked against ray==2.60.0; with
another Ray version the trainer is left as Ray made it (the subclass relies on Ray's internals).

Imported by the Train controller and the cleaner actor (they unpickle these classes): no torch.
"""
from __future__ import annotations

import contextlib
import logging
import queue

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner

PATCHED_RAY = "2.60.0"
logger = logging.getLogger(__name__)


def controller_state(actor_id: str) -> str:
    """The GCS's state of an actor ("ALIVE", "DEAD", ...; "DEAD" once the GCS forgot it), or
    "UNKNOWN" when the GCS did not answer."""
    try:
        info = ray._private.state.actors(actor_id)
    except Exception:
        return "UNKNOWN"
    return info.get("State", "DEAD") if isinstance(info, dict) else "UNKNOWN"


class SteadyPlacementGroupCleaner(PlacementGroupCleaner):
    """Ray's cleaner with one change: the controller is dead only when the GCS says so."""

    def _monitor_loop(self):
        pg = None
        while not self._stop_event.is_set():
            with contextlib.suppress(queue.Empty):
                pg = self._pg_queue.get(timeout=self._check_interval_s)
            if controller_state(self._controller_actor_id) == "DEAD":
                with contextlib.suppress(queue.Empty):
                    while True:  # the newest registration wins (ray-project/ray#62753)
                        pg = self._pg_queue.get_nowait()
                self._cleanup_placement_group(pg)
                break
        self._exit()
        self._monitor_thread = None


class SteadyPlacementGroupCleanerCallback(PlacementGroupCleanerCallback):
    """Ray's callback, launching ``SteadyPlacementGroupCleaner`` (same options as Ray's)."""

    def after_controller_start(self, train_run_context):
        self._controller_actor_id = ray.get_runtime_context().get_actor_id()
        try:
            self._cleaner = ray.remote(num_cpus=0)(SteadyPlacementGroupCleaner).options(
                lifetime="detached", get_if_exists=False, resources={HEAD_NODE_RESOURCE_NAME: 0.001},
                scheduling_strategy="DEFAULT",
            ).remote(controller_actor_id=self._controller_actor_id, check_interval_s=self._check_interval_s,
                     get_actor_timeout_s=self._get_actor_timeout_s, stop_timeout=self._stop_timeout)
        except Exception as e:
            logger.warning(f"could not launch the placement-group cleaner ({e}): a crashed controller's "
                           "placement group stays until the job ends")
            self._cleaner = None
            return
        self._cleaner.start_monitoring.remote()


def steady_trainer(trainer_cls: type) -> type:
    """A subclass of Ray Train's ``trainer_cls`` (e.g. ``TorchTrainer``) whose placement-group
    cleaner waits for the GCS's word (module docstring); ``trainer_cls`` itself with another Ray."""
    if ray.__version__ != PATCHED_RAY:
        return trainer_cls

    class Steady(trainer_cls):
        def _create_default_callbacks(self):
            return [SteadyPlacementGroupCleanerCallback() if type(cb) is PlacementGroupCleanerCallback else cb
                    for cb in super()._create_default_callbacks()]

    Steady.__name__ = Steady.__qualname__ = trainer_cls.__name__
    return Steady
