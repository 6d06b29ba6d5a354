"""`nanoslg serve`: start the engine, then the HTTP server in this process and, with --api-server-count N, in N - 1
more processes on the same listening socket (nanoslg/server/api_servers.py)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile

from nanoslg.config import EngineConfig
from nanoslg.engine_args import add_engine_arguments, engine_config_from_args
from nanoslg.logs import setup_logging
from nanoslg.model_spec import ConfigError


DEMO_MAX_TOKENS = 256  # a rambling answer ends within ~15 s on two cores (512 took 29 s: the README test's 30 s limit)


def add_serve_arguments(parser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("NANOSLG_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (env NANOSLG_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model id clients use (default: folder name)")
    g.add_argument("--max-queued-requests", type=int, default=4096,
                   help="requests in progress beyond which new ones get 503")
    g.add_argument("--max-waiting-requests", type=int, default=2048,
                   help="requests waiting to start (tokenizing or queued for the scheduler) beyond which new ones "
                        "get 503 with Retry-After at once")
    g.add_argument("--max-tokens-default", type=int, default=None,
                   help=f"max_tokens of a request that sets none (default: up to max_model_len; {DEMO_MAX_TOKENS} for "
                        f"the default demo model)")
    g.add_argument("--tool-call-parser", default="auto", choices=("auto", "hermes", "llama3_json", "mistral"),
                   help="how the model writes tool calls, parsed out of its replies under tool_choice auto (default: "
                        "read from the chat template; hermes when it has no tool support)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are aborted")
    g.add_argument("--no-restart", dest="restart", action="store_false",
                   help="exit when an engine process dies instead of restarting the engine (it restarts up to "
                        "3 times within 5 minutes, then exits non-zero)")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest accepted request body")
    g.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no INFO line per request (client, method, path, status, prompt and output tokens, finish "
                        "reason, TTFT, duration)")
    g.add_argument("--api-server-count", type=int, default=None,
                   help="HTTP server processes on the port, each with its own link to the engine (default: one per "
                        "4 cores left by the engine's processes, 1 to 8); the queue limits hold for all of them "
                        "together")


def _max_tokens_default(args: argparse.Namespace, model: str) -> int | None:
    """--max-tokens-default, else DEMO_MAX_TOKENS for the default demo model: a 135M model in 4 bits rambles, and
    a request without max_tokens would then run to max_model_len (minutes on a laptop's CPU)."""
    from nanoslg.model_registry import DEFAULT_MODEL, models_dir

    if args.max_tokens_default is not None:
        return args.max_tokens_default
    if os.path.normpath(model) == os.path.join(models_dir(), DEFAULT_MODEL):
        logging.getLogger("nanoslg.server").info(
            "%s is a small demo model: requests that set no max_tokens get at most %d tokens "
            "(--max-tokens-default N to change)", DEFAULT_MODEL, DEMO_MAX_TOKENS)
        return DEMO_MAX_TOKENS
    return None


def run_serve(args) -> int:
    from nanoslg.launcher import run_worker_node

    cfg = engine_config_from_args(args)
    setup_logging(cfg.log_level, cfg.log_format)
    for flag, value, least in (("--max-waiting-requests", args.max_waiting_requests, 1),
                               ("--max-queued-requests", args.max_queued_requests, 1),
                               ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if value < least:  # a queue limit of 0 would refuse every request
            print(f"nanoslg serve: {flag} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    if args.max_tokens_default is not None and args.max_tokens_default < 1:
        print(f"nanoslg serve: --max-tokens-default must be >= 1, got {args.max_tokens_default}", file=sys.stderr)
        return 2
    if cfg.node_rank > 0:  # a worker node runs no HTTP server (and needs none of its packages)
        return run_worker_node(cfg)
    from nanoslg.server.api_servers import default_api_server_count

    count = args.api_server_count
    if count is None:
        count = default_api_server_count(2 + len(cfg.local_ranks))  # the tokenizer, the scheduler, the workers
    if count < 1:
        print(f"nanoslg serve: --api-server-count must be >= 1, got {count}", file=sys.stderr)
        return 2
    server_dir = tempfile.mkdtemp(prefix="nanoslg-api-")  # mode 0700, outlives engine restarts
    try:
        return _serve(args, cfg, count, server_dir)
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)


def _serve(args: argparse.Namespace, cfg: EngineConfig, count: int, server_dir: str) -> int:
    from nanoslg.launcher import EngineStartupError
    from nanoslg.server.api_servers import ApiServerPool, ApiServerStartupError, client_inbox

    from nanoslg.server import queue_counts

    # before prometheus-client is imported, in this process and (inherited) the others; one process keeps its
    # metrics in memory, whatever the environment says (a stale directory would be summed in)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    counts = None
    if count > 1:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(server_dir, "metrics")
        os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        cfg = dataclasses.replace(cfg, client_inboxes=[client_inbox(server_dir, k) for k in range(1, count)])
        counts_path = os.path.join(server_dir, "queue_counts")
        queue_counts.create(counts_path, count)
        counts = queue_counts.QueueCounts(counts_path, 0)
    import uvicorn

    from nanoslg.server.app import ServerSettings, build_app
    from nanoslg.server.async_engine import SupervisedEngine
    from nanoslg.server.lifecycle import DrainingServer

    try:
        engine = SupervisedEngine(cfg, args.max_queued_requests, args.max_waiting_requests, args.restart,
                                  counts=counts)
    except (ConfigError, EngineStartupError) as e:
        print(f"nanoslg serve: {e}", file=sys.stderr)
        return 1
    name = args.served_model_name or os.path.basename(os.path.normpath(engine.cfg.model))
    settings = ServerSettings(name, args.api_key, int(args.max_body_mb * 1024 * 1024),
                              _max_tokens_default(args, engine.cfg.model), args.tool_call_parser, args.access_log)
    # log_config=None: uvicorn's loggers go through ours (one format, --log-format json included)
    # uvicorn's access log is ours (nanoslg/server/access_log.py), with the tokens and finish reasons added
    config = uvicorn.Config(build_app(engine, settings), host=args.host, port=args.port, log_config=None,
                            log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5)
    pool = None
    try:
        listener = config.bind_socket()
        if count > 1:
            spec = {"settings": settings.to_dict(), "max_queued_requests": args.max_queued_requests,
                    "max_waiting_requests": args.max_waiting_requests, "shutdown_timeout": args.shutdown_timeout,
                    "queue_counts": counts_path}
            pool = ApiServerPool(engine, count, server_dir, listener.fileno(), spec)
            pool.spawn_all()
        how = "--api-server-count" if args.api_server_count else f"the default for {len(os.sched_getaffinity(0))} cores"
        weights, kv = engine.cfg.storage_dtypes
        serving = (f"nanoslg: serving {name} ({weights} weights, {kv} KV cache) on http://{args.host}:{args.port} "
                   f"with {count} API-server process{'es' if count > 1 else ''} ({how}; engine run dir "
                   f"{engine.cfg.run_dir})")
        if cfg.log_format == "json":  # a log shipper reads JSON lines only
            logging.getLogger("nanoslg.server").warning(serving)
        else:
            print(serving, file=sys.stderr, flush=True)
        DrainingServer(config, engine, args.shutdown_timeout, peers=pool).run(sockets=[listener])
    except ApiServerStartupError as e:
        print(f"nanoslg serve: {e}", file=sys.stderr)
        return 1
    finally:
        if pool is not None:
            pool.close()
        engine.close()
    return engine.exit_code
