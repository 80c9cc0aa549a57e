#!/usr/bin/env bash
# Install kairos-core, every plugin in plugins/, the test tools and the linters (ruff, mypy) into
# ./.venv, on Debian/Ubuntu.
# Debian packages: gcc + libgmp-dev build fastecdsa (a libp2p dependency), gcc + libssl-dev the
# VPN's C fast path (optional: without them it runs in pure Python); iproute2 and nftables
# build the namespace labs of the tests; iperf3, openssh and ping are driven through the VPN tests,
# curl and iperf3 through the services plugin's tests, dig (dnsutils) through the DNS plugin's;
# systemd brings systemd-analyze, which verifies the unit kairos daemon install writes;
# chromium + chromium-driver are the browser tests/test_dashboard_browser.py drives (with selenium).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends \
    gcc libgmp-dev libssl-dev python3-venv iproute2 nftables iperf3 curl openssh-server openssh-client iputils-ping systemd dnsutils \
    chromium chromium-driver >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
plugin_args=()
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && plugin_args+=(-e "$plugin")
done
# testing/ is the test kit (kairos-testing): the fixtures and labs of every test tree
.venv/bin/python -m pip install -q -e '.[test,lint]' -e ./testing "${plugin_args[@]}"
# selenium drives the Debian chromium in the dashboard's browser test (its own driver download
# is never used: the test names /usr/bin/chromedriver)
.venv/bin/python -m pip install -q 'selenium>=4.20,<5'
echo "installed: $(.venv/bin/kairos version | tr '\n' ';')"
