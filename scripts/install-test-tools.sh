#!/usr/bin/env bash
# System tools some tests need: the deploy validators (scripts/validate_deploy.sh installs them),
# promtool, and from Debian's packages Chromium (browser tests) and iproute2 (network-namespace tests).
# Installed only when missing and when we can (root with apt-get); otherwise the tests that need
# them skip and say what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/validate_deploy.sh --install-only || echo "test tools: deploy validators not installed"
# promtool (checks deploy/prometheus/: config, alert rules and their unit tests): only the binary, taken
# out of Debian's `prometheus` package into .cache/prometheus (installing the package would also
# install and start a Prometheus server).
if ! command -v promtool >/dev/null && ! [ -x .cache/prometheus/usr/bin/promtool ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test tools: unpacking promtool from Debian's prometheus package into .cache/prometheus"
    tmp="$(mktemp -d)"
    if (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
          || { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null 2>&1; }; }); then
      mkdir -p .cache/prometheus
      dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" && install -D -m 0755 "$tmp/x/usr/bin/promtool" \
        .cache/prometheus/usr/bin/promtool
    else
      echo "test tools: apt-get download prometheus failed; the promtool tests will skip with a reason"
    fi
    rm -rf "$tmp"
  else
    echo "test tools: promtool missing (not root or no apt-get); the promtool tests will skip with a reason"
  fi
fi
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test tools: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "test tools: apt-get install failed; dependent tests will skip with a reason"
else
  echo "test tools: missing ${need[*]} (not root or no apt-get); dependent tests will skip with a reason"
fi
exit 0
