#!/bin/sh
# An options reference must be what the program's --help-markdown prints:
# the doc (docs/configuration.md for kvtierd, docs/kvtier-llama.md for the
# plugin) contains that table verbatim between its markers.
set -eu
kvtierd=$1
doc=$2
want=$("$kvtierd" --help-markdown)
have=$(sed -n '/<!-- options:begin -->/,/<!-- options:end -->/p' "$doc" | sed '1d;$d')
if [ "$want" != "$have" ]; then
  echo "$doc is out of date; regenerate its table with: $(basename "$kvtierd") --help-markdown"
  printf '%s\n' "$want" > /tmp/kvtier-config-want.$$
  printf '%s\n' "$have" | diff -u - /tmp/kvtier-config-want.$$ || true
  rm -f /tmp/kvtier-config-want.$$
  exit 1
fi
echo "$doc matches $(basename "$kvtierd") --help-markdown"
