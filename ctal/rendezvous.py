"""torch.distributed's rank-0 TCP store, listening on one address instead of every interface.

``init_process_group(init_method="tcp://ADDR:PORT")`` (or ``env://``) makes rank 0 a ``TCPStore``
server, and torch binds that server to every interface whatever ADDR says: anyone who can reach
the machine can then write into the process group's rendezvous. torch takes no bind address, but
its rendezvous asks for a *multi-tenant* store, which reuses a server already running in the
process on the same port. So rank 0 starts one first, on a socket bound to ADDR alone
(``master_listen_fd``), and the rendezvous that follows shares it. Used by the local launcher
(``ctal.pretrain.launch_local``) and by Ray Train's workers (``ctal.distributed.torch_backend``).
"""
from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

_servers: dict[int, dist.TCPStore] = {}  # port -> the server's store: a server lives while its store does


def serve_store(addr: str, port: int = 0, timeout_s: float = 1800) -> int:
    """Start this process's TCP store server on ``addr:port`` (0: a free port) and return the port;
    call on rank 0 before ``init_process_group`` with that address and port."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
        store = dist.TCPStore(addr, port, None, True, datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    _servers[port] = store
    return port


def release_store(port: int) -> None:
    """Stop the server ``serve_store`` started on ``port`` (once the process group that used it is
    destroyed); nothing if there is none."""
    _servers.pop(port, None)
