#!/usr/bin/env bash
# Make `import diffseg` work from this source tree without installing (no compiled extension): for the pure-Python
# parts (phantoms, training) on a machine where the package cannot be built, such as a lent GPU box.
# Usage: source scripts/source-env.sh
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_pkg="$_root/build/srcpkg/diffseg"
mkdir -p "$_pkg"
for _d in runtime export models; do ln -sfn "$_root/$_d" "$_pkg/$_d"; done
for _f in __init__.py __main__.py; do ln -sfn "$_root/src/diffseg/$_f" "$_pkg/$_f"; done
export PYTHONPATH="$_root/build/srcpkg${PYTHONPATH:+:$PYTHONPATH}"
