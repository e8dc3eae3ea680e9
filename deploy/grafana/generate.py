#!/usr/bin/env python3
"""Writes the provisioned Grafana dashboards (deploy/grafana/dashboards/*.json).

The dashboards are generated so their panels stay consistent (datasource, units, legends) and
so every PromQL expression lives in one reviewable place. tests/prometheus.rs runs every
expression of every dashboard against a real Prometheus scraping the services.

    python3 deploy/grafana/generate.py          # write the files
    python3 deploy/grafana/generate.py --check  # fail if the files are out of date
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}
FORCE = 'force=~"$force"'


def var_force():
    q = "label_values(safeclock_referrals_received_total, force)"
    return {
        "name": "force", "label": "Force", "type": "query", "datasource": DS,
        "definition": q, "query": {"qryType": 1, "query": q, "refId": "force"},
        "refresh": 2, "regex": "", "sort": 1, "multi": True, "includeAll": True,
        "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def var_rule():
    q = "label_values(safeclock_sla_transitions_total, rule)"
    return {
        "name": "rule", "label": "Rule", "type": "query", "datasource": DS,
        "definition": q, "query": {"qryType": 1, "query": q, "refId": "rule"},
        "refresh": 2, "regex": "", "sort": 1, "multi": False, "includeAll": False,
        "current": {"selected": True, "text": "victim-contact", "value": "victim-contact"},
    }


class Board:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description, self.variables = uid, title, description, variables
        self.panels, self.x, self.y, self.row_h = [], 0, 0, 0

    def panel(self, kind, title, description, targets, unit="short", w=12, h=8, **extra):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        panel = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DS, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
            "options": extra.pop("options", {}),
            "targets": [
                {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                 "editorMode": "code", "range": kind == "timeseries",
                 "instant": kind != "timeseries"}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
            panel["options"].setdefault("legend", {"displayMode": "table", "placement": "right",
                                                   "showLegend": True, "calcs": ["mean", "max"]})
            panel["options"].setdefault("tooltip", {"mode": "multi", "sort": "desc"})
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self):
        return {
            "id": None, "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["safeclock"], "timezone": "browser", "editable": False, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "1m",
            "time": {"from": "now-7d", "to": "now"}, "timepicker": {},
            "fiscalYearStartMonth": 0, "liveNow": False,
            "links": [{"type": "dashboards", "tags": ["safeclock"], "asDropdown": True,
                       "title": "safeclock dashboards", "includeVars": True, "keepTime": True}],
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def met_ratio(by, selector, rng="$__range"):
    met = f'sum{by} (increase(safeclock_sla_transitions_total{{{selector},transition="met"}}[{rng}]))'
    stopped = f'sum{by} (increase(safeclock_sla_transitions_total{{{selector},transition=~"met|met_late"}}[{rng}]))'
    return f"{met} / {stopped}"


def force_overview():
    b = Board("safeclock-overview", "safeclock — force overview",
              "How quickly forces respond to child-protection referrals: referrals in, open clocks, "
              "breaches by rule, share met within target, time to first response.",
              [var_force()])
    b.panel("timeseries", "Referrals received, by force",
            "Referrals received per second (safeclock_referrals_received_total).",
            [(f'sum by (force) (rate(safeclock_referrals_received_total{{{FORCE}}}[$__rate_interval]))', "{{force}}")],
            unit="cps")
    b.panel("bargauge", "Referrals received in the range, by category",
            "referral_received events in the selected range, by category.",
            [(f'sum by (category) (increase(safeclock_referrals_received_total{{{FORCE}}}[$__range]))', "{{category}}")],
            options={"orientation": "horizontal", "displayMode": "basic"})
    b.panel("stat", "Open clocks, by state",
            "Clocks started and not yet stopped: running, warned (past a warning threshold), paused, breached.",
            [(f'sum by (state) (force_rule_state:safeclock_sla_open_clocks:sum{{{FORCE}}})', "{{state}}")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"})
    b.panel("stat", "Met within target (range)",
            "Share of clocks stopped in the range that stopped by their deadline (met / (met + met late)).",
            [(met_ratio("", FORCE), "met within target")],
            unit="percentunit", w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("stat", "Breaches (range)", "SLA clocks that passed their deadline in the range.",
            [(f'sum(increase(safeclock_sla_breaches_total{{{FORCE}}}[$__range]))', "breaches")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("bargauge", "SLA breaches by rule (range)",
            "Clocks that passed their deadline in the range, by rule.",
            [(f'sum by (rule) (increase(safeclock_sla_breaches_total{{{FORCE}}}[$__range]))', "{{rule}}")],
            options={"orientation": "horizontal", "displayMode": "gradient"})
    b.panel("bargauge", "Met within target, by rule (range)",
            "Per rule: met / (met + met late) over the range.",
            [(met_ratio(" by (rule)", FORCE), "{{rule}}")],
            unit="percentunit", options={"orientation": "horizontal", "displayMode": "gradient"},
            fieldConfig={"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []})
    b.panel("bargauge", "Time to first response (child victim contacted), p50 by category",
            "Median time from referral to the child victim being contacted (rule victim-contact), in the range.",
            [(f'histogram_quantile(0.5, sum by (category, le) (increase(safeclock_sla_time_to_stop_seconds_bucket{{{FORCE},rule="victim-contact"}}[$__range])))', "{{category}}")],
            unit="s", options={"orientation": "horizontal", "displayMode": "basic"})
    b.panel("bargauge", "Time to first response (child victim contacted), p90 by category",
            "90th percentile of the time from referral to the child victim being contacted, in the range.",
            [(f'histogram_quantile(0.9, sum by (category, le) (increase(safeclock_sla_time_to_stop_seconds_bucket{{{FORCE},rule="victim-contact"}}[$__range])))', "{{category}}")],
            unit="s", options={"orientation": "horizontal", "displayMode": "basic"})
    b.panel("timeseries", "Breaches per hour, by rule",
            "Breaches in the trailing hour (recording rule force_rule:safeclock_sla_breaches:increase1h).",
            [(f'sum by (rule) (force_rule:safeclock_sla_breaches:increase1h{{{FORCE}}})', "{{rule}}")])
    b.panel("bargauge", "Oldest open breach, by rule",
            "How long the oldest open breached clock of each rule has been past its deadline.",
            [(f'max by (rule) (safeclock_sla_oldest_breach_age_seconds{{{FORCE}}})', "{{rule}}")],
            unit="s", options={"orientation": "horizontal", "displayMode": "basic"})
    return b


def rule_drilldown():
    sel = f'{FORCE},rule="$rule"'
    b = Board("safeclock-rule", "safeclock — rule drill-down",
              "One timescale in depth: clock transitions, share met within target, the distribution of "
              "time to stop against the target, open clocks and breaches by category and risk.",
              [var_force(), var_rule()])
    b.panel("timeseries", "Clock transitions", "Started, warning, breached, met, met late, cancelled, per second.",
            [(f'sum by (transition) (rate(safeclock_sla_transitions_total{{{sel}}}[$__rate_interval]))', "{{transition}}")],
            unit="cps")
    b.panel("timeseries", "Met within target (trailing day)",
            "met / (met + met late) over the trailing day (recording rule).",
            [(f'avg by (force) (force_rule:safeclock_sla_met_within_target:ratio1d{{{sel}}})', "{{force}}")],
            unit="percentunit")
    b.panel("stat", "Time to stop: p50, p90, p99 (range)",
            "Quantiles of the time from clock start to stop, minus pauses. Buckets sit at the rule's target and its multiples.",
            [(f'histogram_quantile({q}, sum by (le) (increase(safeclock_sla_time_to_stop_seconds_bucket{{{sel}}}[$__range])))', f"p{int(q * 100)}")
             for q in (0.5, 0.9, 0.99)],
            unit="s", options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("bargauge", "Time to stop, by bucket (range)",
            "Clocks stopped within each bucket bound (cumulative); the bound equal to the target is the 'within target' count.",
            [(f'sum by (le) (increase(safeclock_sla_time_to_stop_seconds_bucket{{{sel}}}[$__range]))', "{{le}}")],
            options={"orientation": "horizontal", "displayMode": "basic"})
    b.panel("stat", "Open clocks, by state", "Open clocks of this rule by state.",
            [(f'sum by (state) (safeclock_sla_open_clocks{{{sel}}})', "{{state}}")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("bargauge", "Open clocks, by category", "Open clocks of this rule by category.",
            [(f'sum by (category) (safeclock_sla_open_clocks{{{sel}}})', "{{category}}")],
            w=8, options={"orientation": "horizontal", "displayMode": "basic"})
    b.panel("stat", "Oldest open breach", "Time since the deadline of the oldest open breached clock.",
            [(f'max(safeclock_sla_oldest_breach_age_seconds{{{sel}}})', "oldest")],
            unit="s", w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("table", "Breaches by category and risk (range)", "Breaches of this rule in the range.",
            [(f'sum by (category, risk) (increase(safeclock_sla_transitions_total{{{sel},transition="breached"}}[$__range]))', "")],
            w=24, options={"showHeader": True})
    return b


def escalations():
    b = Board("safeclock-escalations", "safeclock — escalations",
              "Whether the people on duty hear about breaches: notifications by receiver and outcome, "
              "delivery latency, failing deliveries, open escalations by level, time to acknowledge.",
              [])
    b.panel("timeseries", "Notifications by receiver and outcome",
            "Final outcome of each notification (delivered, failed), per second.",
            [('sum by (receiver, outcome) (rate(safeclock_escalations_total[$__rate_interval]))', "{{receiver}} {{outcome}}")],
            unit="cps")
    b.panel("timeseries", "Failing deliveries",
            "Delivery attempts that failed, per second, by receiver and result (retries included).",
            [('sum by (receiver, result) (rate(safeclock_escalation_attempts_total{result!="ok"}[$__rate_interval]))', "{{receiver}} {{result}}")],
            unit="cps")
    b.panel("timeseries", "Delivery latency p50 / p99",
            "Time from the first attempt to the final outcome, by receiver.",
            [(f'histogram_quantile({q}, sum by (receiver, le) (rate(safeclock_escalation_delivery_seconds_bucket[$__rate_interval])))', f"{{{{receiver}}}} p{int(q * 100)}")
             for q in (0.5, 0.99)],
            unit="s")
    b.panel("timeseries", "Open escalations by level",
            "Escalations not yet resolved, by the highest level paged and whether someone acknowledged.",
            [('sum by (level, status) (safeclock_escalations_open)', "level {{level}} {{status}}")],
            unit="short")
    b.panel("timeseries", "Time to acknowledge p50 / p90",
            "From an escalation opening to its first acknowledgement through the API.",
            [(f'histogram_quantile({q}, sum by (le) (rate(safeclock_escalation_time_to_acknowledge_seconds_bucket[$__rate_interval])))', f"p{int(q * 100)}")
             for q in (0.5, 0.9)],
            unit="s")
    b.panel("timeseries", "Undeliverable: pending, breakers open, dead letters",
            "Notifications waiting for delivery, receivers whose circuit breaker is open, and notifications given up on (dead-lettered) per second.",
            [('sum(safeclock_escalation_pending_notifications)', "pending"),
             ('sum(safeclock_escalation_breaker_open)', "breakers open"),
             ('sum by (receiver) (rate(safeclock_escalation_dead_letters_total[$__rate_interval]))', "dead letters {{receiver}}")],
            unit="short")
    b.panel("stat", "Breaches vs escalations delivered (range)",
            "Breaches in the range beside notifications delivered: a gap means people were not told.",
            [('sum(increase(safeclock_sla_breaches_total[$__range]))', "breaches"),
             ('sum(increase(safeclock_escalations_total{outcome="delivered"}[$__range]))', "delivered")],
            options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    return b


def service_health():
    b = Board("safeclock-health", "safeclock — service health",
              "Are the services up and keeping up: scrape status, records consumed, invalid records by "
              "reason, dead letters, consumer lag, processing latency, restarts, clock state.",
              [])
    b.panel("stat", "Targets up", "1 when Prometheus scraped the target successfully.",
            [('up{job=~"safeclock.*"}', "{{job}} {{instance}}")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("stat", "Restarts (range)", "Process restarts in the range.",
            [('changes(process_start_time_seconds{job=~"safeclock.*"}[$__range])', "{{job}} {{instance}}")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("stat", "Dead letters (range)", "Records sent to the dead-letter topic in the range, by service.",
            [('sum by (service) (increase(safeclock_dead_letters_total[$__range]))', "{{service}}")],
            w=8, options={"reduceOptions": {"calcs": ["lastNotNull"]}})
    b.panel("timeseries", "Records consumed", "Records read per second, by service and topic.",
            [('sum by (service, topic) (rate(safeclock_records_consumed_total[$__rate_interval]))', "{{service}} {{topic}}")],
            unit="cps")
    b.panel("timeseries", "Invalid records, by reason", "Records refused as invalid (each went to the dead-letter topic).",
            [('sum by (service, reason) (rate(safeclock_records_invalid_total[$__rate_interval]))', "{{service}} {{reason}}")],
            unit="cps")
    b.panel("timeseries", "Consumer lag", "Records behind the end of the input partitions, by service (librdkafka statistics).",
            [('service:safeclock_consumer_lag:sum', "{{service}}")])
    b.panel("timeseries", "Record latency p99", "Time from a record being produced to being processed.",
            [('histogram_quantile(0.99, sum by (service, le) (rate(safeclock_record_latency_seconds_bucket[$__rate_interval])))', "{{service}}")],
            unit="s")
    b.panel("timeseries", "Batch processing p99", "Time from a batch's first record to its offsets being stored.",
            [('histogram_quantile(0.99, sum by (service, le) (rate(safeclock_batch_processing_seconds_bucket[$__rate_interval])))', "{{service}}")],
            unit="s")
    b.panel("timeseries", "Clock state", "Open clocks, pending timers and partitions held by the clock instances.",
            [('sum(safeclock_clock_open_clocks)', "open clocks"),
             ('sum(safeclock_clock_pending_timers)', "pending timers"),
             ('sum(safeclock_clock_partitions)', "partitions")])
    b.panel("timeseries", "Resident memory", "Resident set size of each process.",
            [('process_resident_memory_bytes{job=~"safeclock.*"}', "{{job}} {{instance}}")],
            unit="bytes")
    return b


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for board in (force_overview(), rule_drilldown(), escalations(), service_health()):
        path = OUT / f"{board.uid}.json"
        text = json.dumps(board.json(), indent=2, ensure_ascii=False) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python3 deploy/grafana/generate.py):", *stale, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
