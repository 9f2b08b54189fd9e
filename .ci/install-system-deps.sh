#!/usr/bin/env bash
# System packages some tests need, from Debian's archive (run as root):
#   chromium    tests/dashboards/test_report_e2e.py opens the HTML report headless
#   postgresql  tests/orchestration/test_jobs.py runs MLflow on a throwaway PostgreSQL
# Those tests fail, never skip, when the packages are missing. Idempotent.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)

if [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
chromium --version
ls /usr/lib/postgresql/*/bin/initdb
