#!/usr/bin/env bash
# Set up crowdtrain on a fresh machine: a .venv with the CPU build of torch and the package.
#   bash deploy/setup.sh          runtime only
#   bash deploy/setup.sh --test   plus what the test suite needs
# Idempotent: a second run with unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "setup.sh: unknown option $arg (expected --test)" >&2; exit 2 ;;
  esac
done

# Browser tests drive Debian's Chromium (never a downloaded browser build).
if [ "$want_test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing Debian's chromium for the browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: /usr/bin/chromium is missing (apt-get install chromium); browser tests will skip" >&2
  fi
fi

# The deployment test (tests/test_deploy.py) runs Debian's Caddy in a private network namespace
# (unshare and ip: util-linux, iproute2).
if [ "$want_test" = 1 ] && { ! command -v caddy >/dev/null || ! command -v ip >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing Debian's caddy and iproute2 for the deployment test" >&2
    had_caddy=$(command -v caddy || true)
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq caddy iproute2 >/dev/null
    # the package enables its own service with a default site on :80; the test starts its own Caddy
    if [ -z "$had_caddy" ] && [ -d /run/systemd/system ]; then
      systemctl disable --now caddy.service >/dev/null 2>&1 || true
    fi
  else
    echo "setup.sh: caddy or ip is missing (apt-get install caddy iproute2); the deployment test will skip" >&2
  fi
fi

# The Redis tests (tests/test_redis.py) start Debian's redis-server on a free loopback port of their own.
if [ "$want_test" = 1 ] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing Debian's redis-server for the Redis tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # the package enables its own service on :6379; the tests start their own (deploy/README.md configures it)
    if [ -d /run/systemd/system ]; then
      systemctl disable --now redis-server.service >/dev/null 2>&1 || true
    fi
  else
    echo "setup.sh: redis-server is missing (apt-get install redis-server); the Redis tests will skip" >&2
  fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup.sh: crowdtrain needs Python 3.11 (torch 2.13.0 CPU wheel); $python is $("$python" --version 2>&1)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# The browser worker's assets: onnxruntime-web from npm, served by the coordinator itself
# (a donor's browser loads nothing from third-party hosts); playwright-core drives Debian's
# Chromium in the tests and benchmarks. Exact versions from worker_web/package-lock.json.
if ! command -v npm >/dev/null; then
  echo "setup.sh: npm is missing (apt-get install npm); the donate page needs onnxruntime-web from npm" >&2
  exit 1
fi
npm_stamp="worker_web/node_modules/.setup-$(cat worker_web/package-lock.json | sha256sum | cut -c1-16)"
if [ ! -f "$npm_stamp" ]; then
  (cd worker_web && npm ci --no-audit --no-fund --loglevel=error)
  touch "$npm_stamp"
fi

stamp=".venv/.setup-$(cat pyproject.toml deploy/setup.sh | sha256sum | cut -c1-16)-$want_test"
if [ ! -f "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  # torch first and pinned: an unpinned torch anywhere would pull the CUDA build (gigabytes).
  "${pip[@]}" torch==2.13.0
  if [ "$want_test" = 1 ]; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
  rm -f .venv/.setup-*
  touch "$stamp"
fi
echo "crowdtrain is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
