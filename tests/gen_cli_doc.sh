#!/bin/sh
# Prints docs/cli.md from the kvtier binary's own --help texts.
# Regenerate with: sh tests/gen_cli_doc.sh build/kvtier > docs/cli.md
set -eu
k=$1
echo "# The kvtier command"
echo
echo "\`kvtier\` is the command-line client of kvtierd, built on libkvtier. This page is its \`--help\`"
echo "output (a test keeps it equal; regenerate with \`sh tests/gen_cli_doc.sh build/kvtier > docs/cli.md\`)."
echo
echo '```'
"$k" --help
echo '```'
for c in info put adopt lookup get stage release ls rm stats report fsck; do
  echo
  echo "## kvtier $c"
  echo
  echo '```'
  "$k" "$c" --help 2>&1
  echo '```'
done
