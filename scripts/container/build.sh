#!/usr/bin/env bash
# Build the CPU variant of the image with podman, from the local Debian base.
# torch comes from this machine's local wheel folder, mounted read-only (not copied in).
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-localhost/sagemaker-llm:cpu}"
base="${BASE_IMAGE:-localhost/bookworm-py:latest}"
scripts/container/make-base.sh "$base"
ca="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
wheels="${LOCAL_WHEELS:-/opt/wheels}"
args=(--format docker --isolation chroot --network host --build-arg "BASE_IMAGE=$base"
      -v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
if [ -d "$wheels" ]; then
    args+=(-v "$wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
fi
# One retry: podman's layer commit has failed here once mid-stream ("io: read/write on closed
# pipe" storing a layer) on a build that passes as is; a real Dockerfile error fails twice, and the
# retry starts from the cached layers.
if ! podman build "${args[@]}" -t "$tag" .; then
    echo "podman build failed; retrying once from its layer cache" >&2
    podman build "${args[@]}" -t "$tag" .
fi
