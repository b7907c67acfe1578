#!/usr/bin/env bash
# bench/prepare_device_deps.sh: run on a Debian machine with apt before a
# GPU check on a machine that cannot install packages. Fills .deps/ (git
# ignores it) with GoogleTest's sources and the jansson and xxHash packages
# unpacked, and the commit; pass ".deps" in the device call's carry list. bench/gpu_check.sh
# then builds from .deps alone (POLYAK_DEPS_ONLY), and scripts/test.sh runs
# this script and a dry run of that check, so the tree it makes is tested.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
packages=(libjansson-dev libjansson4 libxxhash-dev libxxhash0)
[ -d /usr/src/googletest ] ||
  { echo "needs /usr/src/googletest: apt-get install googletest" >&2; exit 1; }
rm -rf "$deps"
mkdir -p "$deps/root" "$deps/debs"
cp -r /usr/src/googletest "$deps/googletest"
download() { (cd "$deps/debs" && apt-get download -qq "${packages[@]}"); }
if ! download; then
  # a fresh machine may have no package lists yet
  [ "$(id -u)" = 0 ] || { echo "apt-get download failed; as root: apt-get update, then again" >&2; exit 1; }
  apt-get update -qq && download
fi
for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$deps/root"; done
rm -rf "$deps/debs"
# the device gets the working tree without .git: the results name this
git -C "$root" describe --always --dirty=+changes >"$deps/commit" 2>/dev/null || rm -f "$deps/commit"
du -sh "$deps"
