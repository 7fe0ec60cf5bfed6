"""Ray Train's torch backend with rank 0's rendezvous store on the node's address, not every interface.

Ray Train's ``_TorchBackend.on_start`` has rank 0 pick a free port on its node IP and then calls
``init_process_group("env://")`` on every worker, where torch's store server binds every interface.
This backend starts that server first, on rank 0's node IP alone (``ctal.rendezvous``): 127.0.0.1 on
the embedded default (``console.loopback_node``), the address the other nodes dial on a cluster. The
rest is Ray's own setup: the same env vars, the same ``_setup_torch_process_group``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.train.torch.config import (TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group,
                                    _TorchBackend)

from .. import rendezvous


def _serve_store(timeout_s: float) -> tuple[str, int]:
    addr = ray.util.get_node_ip_address()
    return addr, rendezvous.serve_store(addr, 0, timeout_s)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig"):
        if backend_config.backend not in ("gloo", "nccl", "cpu:gloo,cuda:nccl"):
            return super().on_start(worker_group, backend_config)  # TPU, HCCL: Ray's own way
        addr, port = worker_group.execute_single(0, _serve_store, backend_config.timeout_s)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend binds rank 0's store to the node address (module docstring);
    pass as ``TorchTrainer(torch_config=BoundStoreTorchConfig())``."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend


def torch_trainer(train_loop_per_worker, **kwargs):
    """Ray Train's ``TorchTrainer`` as every trainer of ours builds it: rank 0's store bound to the
    node address (``BoundStoreTorchConfig``) and the steady placement-group cleaner (``steady_trainer``)."""
    from ray.train.torch import TorchTrainer

    from .pg_cleaner import steady_trainer

    return steady_trainer(TorchTrainer)(train_loop_per_worker, torch_config=BoundStoreTorchConfig(), **kwargs)
