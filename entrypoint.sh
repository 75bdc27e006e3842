#!/bin/sh
# The container's entrypoint. SageMaker starts the image as `docker run IMAGE serve`.
#   serve [FLAGS...]  start the server; flags also come from SM_LLM_* variables
#                     (SM_LLM_MAX_NUM_SEQS=64 is --max-num-seqs 64; see `serve --help`)
#   anything else     run as given (a shell, `python3 -m engine.weights tensorize ...`)
# exec, so that SIGTERM from `docker stop` or SageMaker reaches the server itself.
set -eu
PYTHON="${PYTHON:-python3}"
if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    exec "$PYTHON" -m handler "$@"
fi
exec "$@"
