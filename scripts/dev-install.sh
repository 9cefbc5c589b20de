#!/usr/bin/env bash
# Developer install: builds the extension with pip, then points the installed Python folders back at the source
# tree (symlinks), so that edits to runtime/, export/ and models/ take effect without reinstalling.
# Rerun after changing C++ code. CI does not use this: it installs a normal wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/diffseg-dev-install.lock
flock 9
# Unlink the source folders first: pip's uninstall of the previous install would otherwise delete the source files
# through the symlinks.
site=$(cd /tmp && python -c "import importlib.util, os; s = importlib.util.find_spec('diffseg'); print(os.path.dirname(s.origin) if s else '')" 2>/dev/null || true)
if [ -n "$site" ]; then
  for entry in runtime export models __init__.py __main__.py; do
    if [ -L "$site/$entry" ]; then rm "$site/$entry"; fi
  done
  rm -rf "$site/../diffseg-"*.dist-info
  rm -rf "$site"
fi
pip install --no-build-isolation --no-deps -q . >/tmp/diffseg-dev-install.log 2>&1 || { tail -40 /tmp/diffseg-dev-install.log; exit 1; }
site=$(cd /tmp && python -c "import diffseg, os; print(os.path.dirname(diffseg.__file__))")
for d in runtime export models; do
  rm -rf "${site:?}/$d"
  ln -s "$PWD/$d" "$site/$d"
done
for f in __init__.py __main__.py; do
  rm -f "$site/$f"; ln -s "$PWD/src/diffseg/$f" "$site/$f"
done
echo "diffseg dev install: $site -> $PWD"
