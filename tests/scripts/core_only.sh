#!/usr/bin/env bash
# core_only.sh HEADER SOURCE: every polyak_ function SOURCE calls is declared
# in Part 1 of HEADER (the core), so the example teaches only the core.
set -euo pipefail
header=$1 source=$2
core=$(sed -n '1,/==== Part 2\./p' "$header" | grep -o 'polyak_[a-z0-9_]*(' | sort -u)
used=$(grep -o 'polyak_[a-z0-9_]*(' "$source" | sort -u)
outside=$(comm -23 <(echo "$used") <(echo "$core"))
if [ -n "$outside" ]; then
  echo "$source calls functions declared outside the core of $header:" $outside >&2
  exit 1
fi
echo "$source: $(echo "$used" | wc -l) functions, all in the core"
