#!/usr/bin/env python3
"""Writes gateway-dashboard.json next to this file (the JSON is committed; edit here
and re-run: python3 ops/grafana/generate.py). Grafana 9+ schema, Prometheus datasource
chosen by the ${datasource} variable, gateways by ${instance}."""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
panels = []
next_id = 1


def add(title, targets, x, y, w=12, h=8, unit="short", kind="timeseries",
        desc="", extra=None):
    global next_id
    p = {
        "id": next_id,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), "expr": e,
             "legendFormat": legend, "range": True}
            for i, (e, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]},
                        "colorMode": "value", "graphMode": "area"}
    if extra:
        for k, v in extra.items():
            p[k] = v
    panels.append(p)
    next_id += 1


def row(title, y):
    global next_id
    panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
    next_id += 1


def thresholds(*steps):
    return {"mode": "absolute",
            "steps": [{"color": c, "value": v} for v, c in steps]}


# --- overview ----------------------------------------------------------------------
row("Overview", 0)
add("Up", [(f'up{{job="gateway",{SEL}}}', "{{instance}}")], 0, 1, w=4, h=4, kind="stat",
    desc="1 while Prometheus scrapes the gateway.")
panels[-1]["fieldConfig"]["defaults"]["thresholds"] = thresholds((None, "red"), (1, "green"))
add("Upstream connected", [(f"gateway_upstream_connected{{{SEL}}}", "{{instance}}")],
    4, 1, w=4, h=4, kind="stat", desc="1 while the forwarder holds an upstream session.")
panels[-1]["fieldConfig"]["defaults"]["thresholds"] = thresholds((None, "red"), (1, "green"))
add("Connected devices", [(f"sum(gateway_connected_devices{{{SEL}}})", "devices")],
    8, 1, w=4, h=4, kind="stat")
add("Outbox messages", [(f"sum(gateway_outbox_messages{{{SEL}}})", "messages")],
    12, 1, w=4, h=4, kind="stat", desc="Messages waiting for an upstream PUBACK, both lanes.")
add("Oldest in outbox", [(f"max(gateway_outbox_oldest_age_seconds{{{SEL}}})", "age")],
    16, 1, w=4, h=4, kind="stat", unit="s",
    desc="Age of the oldest message waiting for upstream (0 when empty).")
panels[-1]["fieldConfig"]["defaults"]["thresholds"] = thresholds(
    (None, "green"), (300, "yellow"), (900, "red"))
add("Version", [(f"gateway_build_info{{{SEL}}}", "{{version}}")], 20, 1, w=4, h=4,
    kind="stat", extra={"options": {"reduceOptions": {"calcs": ["lastNotNull"]},
                                    "textMode": "name", "colorMode": "none",
                                    "graphMode": "none"}})

# --- ingest --------------------------------------------------------------------------
row("Ingest and decoding", 5)
add("Readings decoded / s by format",
    [(f"sum by (format) (rate(gateway_readings_decoded_total{{{SEL}}}[$__rate_interval]))",
      "{{format}}"),
     (f"sum(rate(gateway_messages_ingested_total{{{SEL}}}[$__rate_interval]))",
      "MQTT messages ingested")],
    0, 6, unit="reqps",
    desc="A SenML message can carry many readings, so readings can exceed messages.")
add("Dead letters / s by format",
    [(f"sum by (format) (rate(gateway_dead_letters_total{{{SEL}}}[$__rate_interval]))",
      "{{format}}")],
    12, 6, unit="reqps", desc="Payloads that did not decode. `gateway dead-letters` shows them.")
add("Unrouted, throttling, auth failures",
    [(f"sum(rate(gateway_unrouted_total{{{SEL}}}[$__rate_interval]))",
      "unrouted publishes / s"),
     (f"sum(rate(gateway_backpressure_seconds_total{{{SEL}}}[$__rate_interval]))",
      "devices throttled (share of time)"),
     (f"sum(rate(gateway_auth_failures_total{{{SEL}}}[$__rate_interval]))", "auth failures / s")],
    0, 14, unit="short",
    desc="Should be 0. Unrouted: publishes outside the ingest pattern (kept as dead letters). "
         "Throttled: the share of time decode waited for rules or the store, slowing devices down.")
add("Rule evaluations and events",
    [(f"sum(rate(gateway_rule_evaluations_total{{{SEL}}}[$__rate_interval]))",
      "evaluations / s"),
     (f"sum by (type, state) (increase(gateway_events_total{{{SEL}}}[$__rate_interval]))",
      "{{type}} {{state}}")],
    12, 14, unit="short",
    desc="Events by type and state (firing / resolved) per interval, and evaluations per second.")

# --- outbox --------------------------------------------------------------------------
row("Outbox (store and forward)", 22)
add("Outbox depth by lane",
    [(f"sum by (lane) (gateway_outbox_messages{{{SEL}}})", "{{lane}} messages")],
    0, 23, w=8)
add("Outbox bytes by lane",
    [(f"sum by (lane) (gateway_outbox_bytes{{{SEL}}})", "{{lane}}")],
    8, 23, w=8, unit="bytes")
add("Oldest message age by lane",
    [(f"max by (lane) (gateway_outbox_oldest_age_seconds{{{SEL}}})", "{{lane}}")],
    16, 23, w=8, unit="s")
add("Dropped and refused / s",
    [(f"sum by (reason) (rate(gateway_outbox_dropped_total{{{SEL}}}[$__rate_interval]))",
      "dropped: {{reason}}"),
     (f"sum by (lane) (rate(gateway_outbox_refused_total{{{SEL}}}[$__rate_interval]))",
      "refused: {{lane}}"),
     (f"max(gateway_storage_degraded{{{SEL}}})", "storage degraded")],
    0, 31, unit="short",
    desc="Drops: retention limits hit (buffered data lost). Refused: the store could not take appends.")
add("Store commit latency",
    [(f"histogram_quantile(0.5, sum by (le) (rate(gateway_store_commit_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p50"),
     (f"histogram_quantile(0.99, sum by (le) (rate(gateway_store_commit_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p99")],
    12, 31, unit="s",
    desc="One group-commit write transaction including fsync: the window a power cut can lose.")

# --- upstream ------------------------------------------------------------------------
row("Upstream", 39)
add("Upstream connection",
    [(f"max(gateway_upstream_connected{{{SEL}}})", "connected"),
     (f"sum(increase(gateway_upstream_reconnects_total{{{SEL}}}[$__rate_interval]))",
      "reconnects")],
    0, 40, w=8)
add("Forwarded / s by lane",
    [(f"sum by (lane) (rate(gateway_upstream_forwarded_total{{{SEL}}}[$__rate_interval]))",
      "{{lane}}")],
    8, 40, w=8, unit="reqps")
add("Forward latency (outbox append to PUBACK)",
    [(f"histogram_quantile(0.5, sum by (le) (rate(gateway_forward_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p50"),
     (f"histogram_quantile(0.99, sum by (le) (rate(gateway_forward_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p99")],
    16, 40, w=8, unit="s")

# --- process -------------------------------------------------------------------------
row("Process", 48)
add("Connected devices", [(f"gateway_connected_devices{{{SEL}}}", "{{instance}}")],
    0, 49, w=8)
add("Resident memory", [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")],
    8, 49, w=8, unit="bytes")
add("CPU", [(f"rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])", "{{instance}}")],
    16, 49, w=8, unit="percentunit", desc="1 = one core busy.")

dashboard = {
    "__inputs": [],
    "uid": "edge-gateway",
    "title": "Edge gateway",
    "description": "IoT telemetry edge gateway: ingest, outbox, upstream, process (ops/grafana).",
    "tags": ["gateway", "mqtt", "iot"],
    "timezone": "browser",
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Gateway", "type": "query", "datasource": DS,
         "query": {"query": "label_values(gateway_build_info, instance)",
                   "refId": "instance"},
         "definition": "label_values(gateway_build_info, instance)",
         "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1,
         "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gateway-dashboard.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(out)
