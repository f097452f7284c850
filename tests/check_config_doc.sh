#!/bin/sh
# The configuration reference must be what kvtierd --help-markdown prints:
# docs/configuration.md contains that table verbatim between its markers.
set -eu
kvtierd=$1
doc=$2
want=$("$kvtierd" --help-markdown)
have=$(sed -n '/<!-- options:begin -->/,/<!-- options:end -->/p' "$doc" | sed '1d;$d')
if [ "$want" != "$have" ]; then
  echo "docs/configuration.md is out of date; regenerate its table with: kvtierd --help-markdown"
  printf '%s\n' "$want" > /tmp/kvtier-config-want.$$
  printf '%s\n' "$have" | diff -u - /tmp/kvtier-config-want.$$ || true
  rm -f /tmp/kvtier-config-want.$$
  exit 1
fi
echo "configuration reference matches kvtierd --help-markdown"
