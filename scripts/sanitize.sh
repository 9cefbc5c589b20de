#!/usr/bin/env bash
# Builds a copy of diffseg with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option DIFFSEG_SANITIZE) into
# a temporary folder -- never the shared install -- and runs the kernel tests against it with libasan preloaded.
#
#   scripts/sanitize.sh [pytest args...]      (default: tests/cpp/test_resample.py tests/cpp/test_components.py tests/runtime/test_scheduler.py -q)
#
# Exit status: pytest's (a sanitizer report aborts the process, so any finding fails the run). The build folder
# is removed at the end unless KEEP=1; SANITIZE_WORK=<kept folder> reuses it (tests only; with REBUILD=1, an
# incremental rebuild first).
# Takes several minutes on 2 cores (the sanitized build is slow to compile).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ -n "${SANITIZE_WORK:-}" ]; then
  work=$SANITIZE_WORK
  KEEP=1
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/diffseg-sanitize.XXXXXX")
fi
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "sanitize: kept $work"; fi; }
trap cleanup EXIT

if [ -z "${SANITIZE_WORK:-}" ] || [ "${REBUILD:-0}" = 1 ]; then
  echo "sanitize: building into $work/site (build folder $work/build)"
  rm -rf "$work/site"
  # Own build folder and target: the shared build/ folder and site-packages install are left alone.
  DIFFSEG_SANITIZE=ON pip install --no-build-isolation --no-deps --quiet --target "$work/site" \
    --config-settings=build-dir="$work/build" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
fi
python - "$work/site" <<'EOF'
import sys, glob
ext = glob.glob(sys.argv[1] + "/diffseg/_ext*.so")
if not ext:
    sys.exit("sanitize: no extension was built")
print("sanitize: built", ext[0])
EOF

libasan=$(g++ -print-file-name=libasan.so)
libstdcxx=$(g++ -print-file-name=libstdc++.so)
if [ ! -e "$libasan" ]; then echo "sanitize: libasan.so not found (install the compiler's sanitizer runtime)"; exit 1; fi
if [ "$#" -eq 0 ]; then set -- tests/cpp/test_resample.py tests/cpp/test_components.py tests/runtime/test_scheduler.py -q; fi

# The tests import diffseg from the sanitized copy (PYTHONPATH comes before site-packages); -P keeps the repo
# root (which has no compiled extension) off sys.path. libstdc++ is preloaded with libasan so that ASan can
# intercept C++ throws (pybind11 turns argument errors into exceptions). Python itself leaks by design, so leak
# checks are off. Reports go to files: pytest captures stderr, and a halting sanitizer would take it along.
cd "$repo"
rm -f "$work"/asan.* "$work"/ubsan.*
export PYTHONPATH="$work/site"
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:log_path=$work/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/ubsan"
python -P -c "import diffseg, sys; sys.exit(0 if diffseg.__file__.startswith('$work') else 'diffseg not from the sanitized copy: ' + diffseg.__file__)"
status=0
python -P -m pytest -p no:cacheprovider "$@" || status=$?
unset LD_PRELOAD
reports=$(ls "$work"/asan.* "$work"/ubsan.* 2>/dev/null || true)
if [ -n "$reports" ]; then
  echo "sanitize: sanitizer reports:"
  for f in $reports; do echo "== $f"; head -60 "$f"; done
  [ "$status" -ne 0 ] || status=1
fi
echo "sanitize: pytest exit status $status, $(echo "$reports" | grep -c . || true) sanitizer report(s)"
exit "$status"
