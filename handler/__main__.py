"""`python -m handler [flags]`: the server's entry. The only place that reads the environment."""

from __future__ import annotations

import logging
import os
import signal
import sys

from handler.settings import SettingsError, parse_settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings, engine_config = parse_settings(sys.argv[1:] if argv is None else argv,
                                                 os.environ)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loader = None
    if settings.engine_process:
        # The engine's process first: its imports (torch, ~1.5 s) begin while this one still
        # imports the web stack (~0.2 s). It loads the model at once, or waits, imported, for
        # the first request to ask (`--load-on-first-request`).
        from engine import EngineProcessClient

        loader = EngineProcessClient(engine_config, settings.max_pending_requests,
                                     settings.log_level)
        if settings.load_on_first_request:
            loader.spawn()
        else:
            loader.start()
    from handler.app import build_app
    from handler.connections import raise_open_files_limit
    from handler.server import build_server

    raise_open_files_limit()
    server = build_server(build_app(settings, engine_config, loader), settings)
    # uvicorn re-raises SIGTERM once it has shut down gracefully; that shutdown is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
