"""The control link between node 0 and the other nodes of a multi-node engine, both ends.

Node 0's launcher runs a ClusterHub thread (a CURVE ROUTER on --dist-init-addr's PORT+1). Every other node runs its
own workers under a launcher whose NodeUplink says hello (with a digest of its engine configuration), forwards its
workers' READY or FAILED, and exchanges heartbeats with the hub. A node that never joins, stops answering or loses a
worker makes the hub record a failure naming that node, which fails node 0's engine; node 0 shutting down tells the
other nodes to stop their workers."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import zmq

from nanoslg import cluster, ipc, protocol
from nanoslg.config import ResolvedConfig
from nanoslg.protocol import Failed, Heartbeat, NodeDown, NodeHello, ProtocolError, Ready, Shutdown

log = logging.getLogger("nanoslg.cluster")


class ClusterHub:
    """Node 0's end: a thread that admits the other nodes and watches them. `failure` names the first problem."""

    def __init__(self, cfg: ResolvedConfig, ctx: zmq.Context[zmq.Socket[bytes]], secret: bytes):
        self.cfg, self.ctx, self.secret = cfg, ctx, secret
        self.ready: dict[str, dict[str, Any]] = {}  # remote worker name -> what its READY reported
        self.failure: Optional[str] = None
        self.failed = threading.Event()  # set with failure
        self.refused = 0  # handshakes refused so far (tests read it)
        self._nodes: dict[int, list[Any]] = {}  # node rank -> [router identity, last time heard from]
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanoslg-cluster-hub", daemon=True)
        self._thread.start()
        self._bound.wait(10)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.failed.set()
            log.error("%s", reason)

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            refusals = cluster.serve_securely(sock, self.cfg, cluster.CONTROL, self.secret)
        except zmq.ZMQError as e:
            self._fail(f"cannot listen for other nodes on {cluster.endpoint(self.cfg, cluster.CONTROL)}: {e}")
            self._bound.set()
            sock.close(0)
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(refusals.monitor, zmq.POLLIN)
        join_deadline = time.monotonic() + self.cfg.node_join_timeout_s
        next_beat = 0.0
        while not self._stop.is_set():
            events = dict(poller.poll(200))
            if refusals.monitor in events:
                refusals.drain()
                self.refused = refusals.refused
            while sock.poll(0):
                identity, frame = sock.recv_multipart()
                self._on_message(sock, identity, frame)
            now = time.monotonic()
            if now >= next_beat:
                for identity, _ in self._nodes.values():
                    sock.send_multipart([identity, protocol.encode(Heartbeat(0))])
                next_beat = now + cluster.HEARTBEAT_S
            self._check_nodes(now, join_deadline)
        for identity, _ in self._nodes.values():
            sock.send_multipart([identity, protocol.encode(Shutdown("node 0 is shutting down"))])
        refusals.close()
        sock.close()

    def _on_message(self, sock: zmq.Socket[bytes], identity: bytes, frame: bytes) -> None:
        try:
            msg = protocol.decode(frame)
        except ProtocolError as e:
            log.warning("dropped a bad frame on the cluster link: %s", e)
            return
        if isinstance(msg, NodeHello):
            refusal = None
            if not 0 < msg.node_rank < self.cfg.nnodes:
                refusal = (f"a node announced itself as node {msg.node_rank}; this engine has nodes 1.."
                           f"{self.cfg.nnodes - 1}")
            elif msg.config_digest != cluster.config_digest(self.cfg):
                refusal = (f"node {msg.node_rank} runs a different engine configuration from node 0 (model shape, "
                           f"parallel layout or engine flags differ): start every node with the same flags")
            if refusal:  # the refused node learns why and stops, rather than wait for heartbeats that never come
                sock.send_multipart([identity, protocol.encode(Failed(f"node{msg.node_rank}", refusal))])
                self._fail(refusal)
            else:
                self._nodes[msg.node_rank] = [identity, time.monotonic()]
                log.info("node %d joined", msg.node_rank)
            return
        node = next((r for r, (ident, _) in self._nodes.items() if ident == identity), None)
        if node is None:
            log.warning("dropped a %s from a node that has not said hello", type(msg).__name__)
            return
        self._nodes[node][1] = time.monotonic()
        if isinstance(msg, Ready):
            self.ready[msg.name] = msg.info
        elif isinstance(msg, Failed):
            self._fail(f"node {node}: {msg.name} failed to start: {msg.error}")
        elif isinstance(msg, NodeDown):
            self._fail(f"node {node}: {msg.reason}")

    def _check_nodes(self, now: float, join_deadline: float) -> None:
        for node in range(1, self.cfg.nnodes):
            seen = self._nodes.get(node)
            if seen is None and now > join_deadline:
                self._fail(f"node {node} did not join within {self.cfg.node_join_timeout_s:.0f} s (start it with "
                           f"--node-rank {node} --dist-init-addr {self.cfg.dist_init_addr} and the same secret)")
            elif seen is not None and now - seen[1] > cluster.SILENCE_LIMIT_S:
                self._fail(f"node {node} stopped answering (nothing heard for {now - seen[1]:.0f} s)")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class NodeUplink:
    """Another node's end: connects to node 0's hub, says hello, forwards, and watches node 0's heartbeats."""

    def __init__(self, cfg: ResolvedConfig, ctx: zmq.Context[zmq.Socket[bytes]], secret: bytes):
        self.cfg = cfg
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        cluster.connect_securely(self.sock, cfg, cluster.CONTROL, secret)
        self.send(NodeHello(cfg.node_rank, cluster.config_digest(cfg)))
        self.heard_at: Optional[float] = None  # node 0's last heartbeat, None before the first

    def send(self, msg) -> None:
        ipc.send(self.sock, msg)

    def serve(self, launcher) -> int:
        """Run until node 0 says stop (0) or something fails (1). Forwards this node's workers' READY/FAILED."""
        started = time.monotonic()
        next_beat = 0.0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(launcher.inbox, zmq.POLLIN)
        while True:
            events = dict(poller.poll(200))
            while launcher.inbox in events and launcher.inbox.poll(0):
                msg = ipc.recv(launcher.inbox)
                if isinstance(msg, (Ready, Failed)):
                    self.send(msg)
            while self.sock in events and self.sock.poll(0):
                msg = ipc.recv(self.sock)
                self.heard_at = time.monotonic()
                if isinstance(msg, Shutdown):
                    log.warning("node %d: node 0 asked to stop (%s)", self.cfg.node_rank, msg.reason)
                    return 0
                if isinstance(msg, Failed):
                    log.error("node %d: node 0 refused this node: %s", self.cfg.node_rank, msg.error)
                    return 1
            now = time.monotonic()
            if now >= next_beat:
                self.send(Heartbeat(self.cfg.node_rank))
                next_beat = now + cluster.HEARTBEAT_S
            dead = launcher.dead_children()
            if dead:
                self.send(NodeDown(self.cfg.node_rank, "; ".join(dead)))
                log.error("node %d: %s", self.cfg.node_rank, "; ".join(dead))
                return 1
            if self.heard_at is None and now - started > self.cfg.node_join_timeout_s:
                log.error("node %d: node 0 at %s did not answer within %.0f s", self.cfg.node_rank,
                          self.cfg.dist_init_addr, self.cfg.node_join_timeout_s)
                return 1
            if self.heard_at is not None and now - self.heard_at > cluster.SILENCE_LIMIT_S:
                log.error("node %d: node 0 stopped answering", self.cfg.node_rank)
                return 1

    def close(self) -> None:
        self.sock.close()
