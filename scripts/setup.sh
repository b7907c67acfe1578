# scripts/setup.sh: sourced by scripts/demo.sh and scripts/test.sh.
# Finds or installs what the build needs, then offers polyak_build.
#   polyak_build <build dir> [cmake options...]   configure + build

polyak_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# nvcc is optional; the usual toolkit location counts as found
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

polyak_missing_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v make >/dev/null 2>&1 || missing+=(make)
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  echo "${missing[@]}"
}

polyak_install_dependencies() {
  local missing
  missing=$(polyak_missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
      { echo "setup: apt-get failed" >&2; return 1; }
  else
    echo "setup: missing $missing; install it with:" >&2
    echo "  sudo apt-get install -y $missing" >&2
    return 1
  fi
}

polyak_build() {
  local dir=$1
  shift
  cmake -S "$polyak_root" -B "$dir" "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log" >&2; return 1; }
  grep -E '^-- polyak:' "$dir.configure.log"
  cmake --build "$dir" --parallel "$(nproc)" >"$dir.build.log" 2>&1 ||
    { tail -50 "$dir.build.log" >&2; return 1; }
}
