#!/bin/sh
# Every metric family rendered by daemon/metrics.c is documented in docs/metrics.md.
set -eu
src=$1
doc=$2
missing=0
for m in $(grep -o '"\(kvtier\|process\)_[a-z0-9_]*"' "$src" | tr -d '"' | sort -u); do
  grep -q "\`$m\`" "$doc" || { echo "undocumented metric: $m"; missing=1; }
done
[ $missing -eq 0 ] && echo "every metric in metrics.c is in docs/metrics.md"
exit $missing
