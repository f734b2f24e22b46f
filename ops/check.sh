#!/usr/bin/env bash
# Checks the ops files: alert rules (promtool check + unit tests), the Prometheus
# example config, the Grafana dashboard (valid JSON, regenerated = committed), the
# metric names both use against ops/metrics.txt, and the systemd unit
# (systemd-analyze verify). Installs promtool (Debian package prometheus) and python3
# when missing.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "--- installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
fi

echo "--- promtool"
promtool check rules prometheus/gateway-alerts.yml
promtool test rules prometheus/gateway-alerts.test.yml
promtool check config prometheus/prometheus.yml

echo "--- grafana dashboard"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp grafana/gateway-dashboard.json "$tmp/committed.json"
python3 grafana/generate.py >/dev/null
if ! cmp -s grafana/gateway-dashboard.json "$tmp/committed.json"; then
  cp "$tmp/committed.json" grafana/gateway-dashboard.json
  echo "grafana/gateway-dashboard.json differs from generate.py's output: re-run it" >&2
  exit 1
fi

echo "--- metric names against metrics.txt"
python3 - <<'PY'
import json, re, sys
known = {l.strip() for l in open("metrics.txt") if l.strip() and not l.startswith("#")}
dash = json.load(open("grafana/gateway-dashboard.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
exprs += [dash["templating"]["list"][1]["definition"]]
exprs.append(open("prometheus/gateway-alerts.yml").read())
used = set()
for e in exprs:
    used |= set(re.findall(r"\b((?:gateway|process)_[a-z0-9_]+)", e))
def base(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name
unknown = sorted(n for n in used if base(n) not in known and n != "gateway_alerts")
if unknown:
    sys.exit(f"not in metrics.txt: {unknown}")
print(f"{len(used)} names used, all in metrics.txt")
PY

echo "--- systemd unit"
if command -v systemd-analyze >/dev/null; then
  # verify wants the ExecStart binary to exist: check a copy pointing at /bin/true.
  sed 's#/usr/local/bin/gateway#/bin/true#g' systemd/gateway.service >"$tmp/gateway.service"
  out=$(systemd-analyze verify "$tmp/gateway.service" 2>&1) || { echo "$out"; exit 1; }
  if [ -n "$out" ]; then echo "$out"; exit 1; fi
  echo "systemd/gateway.service verified"
else
  echo "systemd-analyze not installed: unit not verified"
fi
echo "ops files OK"
