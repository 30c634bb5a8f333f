#!/usr/bin/env bash
# Checks the monitoring assets with promtool: the Prometheus config, the
# alerting rules and their unit tests (two-model cases included), the
# Grafana dashboard's JSON, and (when an engine is running) the live /metrics
# exposition.
#
#   scripts/check-monitoring.sh [http://127.0.0.1:9100]
#
# Needs Debian's `prometheus` package (apt-get install prometheus), which
# provides promtool. The full live check (a real Prometheus scraping the
# engine, every dashboard query evaluated) is `cargo test --test deploy prometheus_live`.
set -euo pipefail

cd "$(dirname "$0")/.."
PROMTOOL="${PROMTOOL:-promtool}"
if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
    echo "error: promtool not found; install Debian's prometheus package (apt-get install -y prometheus)" >&2
    exit 1
fi

"$PROMTOOL" check config config/prometheus.yml
"$PROMTOOL" check rules config/alerts.yml
"$PROMTOOL" test rules config/alerts.test.yml
for dashboard in dashboards/*.json; do
    python3 -m json.tool "$dashboard" >/dev/null || { echo "error: $dashboard is not valid JSON" >&2; exit 1; }
done

if [[ $# -ge 1 ]]; then
    echo "Checking metrics from $1/metrics"
    curl -fsS "$1/metrics" | "$PROMTOOL" check metrics
fi
echo "monitoring checks passed"
