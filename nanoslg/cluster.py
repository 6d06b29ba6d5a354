"""Links between nodes. Node 0 binds every cross-node ZeroMQ socket on --dist-init-addr's host, at the ports after
torch.distributed's; the other nodes connect. Every such socket uses CURVE: the server key pair is derived from a
secret all nodes share (--cluster-secret-file or $NANOSLG_CLUSTER_SECRET), so only a peer that knows the secret can
complete the handshake, and traffic is encrypted. A stranger can neither submit plans nor read tokens; each refused
handshake is logged. Links within a node stay ipc:// in the run directory."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from nanoslg.config import ResolvedConfig
from nanoslg.model_spec import ConfigError

log = logging.getLogger("nanoslg.cluster")

SECRET_ENV = "NANOSLG_CLUSTER_SECRET"
# Port offsets from --dist-init-addr's PORT (torch.distributed's store is PORT itself).
CONTROL, PLANS, RESULTS = 1, 2, 3
HEARTBEAT_S = 1.0
SILENCE_LIMIT_S = 5.0  # a joined node that sends nothing for this long is taken for dead

_REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def cluster_secret(cfg: ResolvedConfig) -> bytes:
    """The shared secret: the file given, else the environment. Required for more than one node."""
    if cfg.cluster_secret_file:
        try:
            with open(cfg.cluster_secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the cluster secret file: {e}") from None
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if len(secret) < 16:
        raise ConfigError(f"--nnodes {cfg.nnodes} needs a shared secret of at least 16 bytes in "
                          f"--cluster-secret-file or ${SECRET_ENV}, the same on every node")
    return secret


def _server_keys(secret: bytes) -> tuple[bytes, bytes]:
    secret_key = z85.encode(hashlib.sha256(b"nanoslg cluster server key\0" + secret).digest())
    return zmq.curve_public(secret_key), secret_key


def endpoint(cfg: ResolvedConfig, offset: int, bind: bool = False) -> str:
    host, port = cfg.dist_host_port
    if bind:  # ZeroMQ binds to an interface address, not a name
        host = socket.gethostbyname(host)
    return f"tcp://{host}:{port + offset}"


def serve_securely(sock: zmq.Socket[bytes], cfg: ResolvedConfig, offset: int, secret: bytes) -> "RefusalLog":
    """Bind sock on node 0's address as a CURVE server; returns the log of handshakes it refuses."""
    public, secret_key = _server_keys(secret)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret_key
    refusals = RefusalLog(sock, endpoint(cfg, offset))
    sock.bind(endpoint(cfg, offset, bind=True))
    return refusals


def connect_securely(sock: zmq.Socket[bytes], cfg: ResolvedConfig, offset: int, secret: bytes) -> None:
    """Connect sock to node 0 as a CURVE client (its own key pair is ephemeral; the server key proves the secret)."""
    sock.curve_serverkey = _server_keys(secret)[0]
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(endpoint(cfg, offset))


class RefusalLog:
    """Watches a server socket's handshakes and logs each refused peer (a wrong secret, or no CURVE at all). A peer
    that keeps retrying is logged once per LOG_EVERY_S with a count, so it cannot flood the log."""

    LOG_EVERY_S = 10.0

    def __init__(self, sock: zmq.Socket[bytes], name: str):
        self.name = name
        self.monitor = sock.get_monitor_socket(_REFUSALS)
        self.refused = 0
        self._logged_at, self._unlogged = float("-inf"), 0

    def drain(self) -> None:
        """Read (and log) every pending handshake event; call when the monitor socket polls readable."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.refused += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at >= self.LOG_EVERY_S:
                reason = getattr(event["value"], "name", event["value"])
                log.warning("refused %d connection(s) on %s: handshake failed (%s): wrong cluster secret, or not "
                            "a nanoslg node", self._unlogged, self.name, reason)
                self._logged_at, self._unlogged = now, 0

    def close(self) -> None:
        self.monitor.close(linger=0)


def config_digest(cfg: ResolvedConfig) -> str:
    """What every node must agree on: the model's shape and every engine setting except where a node keeps its
    files and how it logs. Two nodes that differ would split the model wrongly."""
    local = {"model", "tokenizer", "run_dir", "node_rank", "log_level", "cluster_secret_file", "startup_timeout_s",
             "node_join_timeout_s", "tuned_config", "tuned_config_path", "client_inboxes"}
    shared = {k: v for k, v in cfg.to_dict().items() if k not in local}
    return hashlib.sha256(repr(sorted(shared.items())).encode()).hexdigest()[:16]
