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
    import uvicorn

    from handler.app import build_app

    app = build_app(settings, engine_config)
    # uvicorn re-raises SIGTERM once it has shut down gracefully; that shutdown is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # uvicorn stops accepting on SIGTERM and lets in-flight requests finish within the grace.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
