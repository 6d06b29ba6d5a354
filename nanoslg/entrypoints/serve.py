"""`nanoslg serve`: start the engine, then the HTTP server in this process."""
from __future__ import annotations

import logging
import os
import sys

from nanoslg.engine_args import add_engine_arguments, engine_config_from_args
from nanoslg.model_spec import ConfigError


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
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest accepted request body")


def run_serve(args) -> int:
    from nanoslg.launcher import EngineStartupError, run_worker_node

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = engine_config_from_args(args)
    if cfg.node_rank > 0:  # a worker node runs no HTTP server (and needs none of its packages)
        return run_worker_node(cfg)
    import uvicorn

    from nanoslg.server.app import ServerSettings, build_app
    from nanoslg.server.async_engine import AsyncEngine

    try:
        engine = AsyncEngine(cfg, args.max_queued_requests)
    except (ConfigError, EngineStartupError) as e:
        print(f"nanoslg serve: {e}", file=sys.stderr)
        return 1
    name = args.served_model_name or os.path.basename(os.path.normpath(engine.cfg.model))
    settings = ServerSettings(name, args.api_key, int(args.max_body_mb * 1024 * 1024))
    print(f"nanoslg: serving {name} on http://{args.host}:{args.port} (engine run dir {engine.cfg.run_dir})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(build_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0
