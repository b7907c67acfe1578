#!/usr/bin/env bash
# The demo: builds polyak (CUDA backend when nvcc and a GPU are there) and
# runs examples/demo.c, a small SGD trainer averaged five ways.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
polyak_install_dependencies
mkdir -p "$polyak_root/build"
polyak_build "$polyak_root/build" -DCMAKE_BUILD_TYPE=Release
exec "$polyak_root/build/examples/polyak_demo" "$@"
