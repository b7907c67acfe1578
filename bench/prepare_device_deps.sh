#!/usr/bin/env bash
# bench/prepare_device_deps.sh: run on a Debian machine with apt before a
# GPU check on a machine that cannot install packages. Fills .deps/ (git
# ignores it) with GoogleTest's sources and the jansson and xxHash packages
# unpacked; pass ".deps" in the device call's carry list.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
rm -rf "$deps"
mkdir -p "$deps/root" "$deps/debs"
[ -d /usr/src/googletest ] || { echo "needs /usr/src/googletest: apt-get install googletest" >&2; exit 1; }
cp -r /usr/src/googletest "$deps/googletest"
(cd "$deps/debs" && apt-get download -qq libjansson-dev libjansson4 libxxhash-dev libxxhash0)
for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$deps/root"; done
rm -rf "$deps/debs"
du -sh "$deps"
