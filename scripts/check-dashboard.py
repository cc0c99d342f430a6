#!/usr/bin/env python3
"""Checks that every metric the dashboards and the Helm chart query is in the catalogue.

The catalogue is the tables of docs/metrics.md (rows `| `name` | type | ...`). Every PromQL
expression of the Grafana dashboards (panel targets and templating queries, both copies) and every
Pods metric the Helm chart's autoscaling values name must be a catalogued metric, or a catalogued
histogram with `_bucket`, `_sum` or `_count`. Every expression must name at least one metric.

Usage: scripts/check-dashboard.py [DASHBOARD.json ...]   (default: both dashboard copies)
Exit status 0 when all is well, 1 with one line per problem otherwise.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "docs" / "metrics.md"
DASHBOARDS = [
    ROOT / "deploy" / "grafana" / "moe-cluster.json",
    ROOT / "helm" / "moe-cluster" / "dashboards" / "moe-cluster.json",
]
HELM_VALUES = [ROOT / "helm" / "moe-cluster" / "values.yaml"] + sorted(
    (ROOT / "helm" / "moe-cluster" / "examples").glob("*.yaml")
)

# PromQL words that are not metric names when they are not followed by "(".
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
}
GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")


def catalogue(markdown: str) -> dict:
    """{name: type} from the catalogue's table rows."""
    out = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4:
            continue
        m = re.fullmatch(r"`(moe_[a-z0-9_]+)`", cells[1])
        if m:
            out[m.group(1)] = cells[2]
    return out


def metric_names(expr: str) -> list:
    """Metric names a PromQL expression (or a Grafana label_values() query) selects."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([^,)]*?)\s*(,[^)]*)?\)\s*", expr)
    if label_values:
        expr = label_values.group(1)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = GROUPING.sub(" ", e)  # grouping label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = []
    for m in IDENT.finditer(e):
        word = m.group(1)
        if word.lower() in KEYWORDS or re.fullmatch(r"[0-9.eE+-]+", word):
            continue
        names.append(word)
    return names


def known(name: str, cat: dict) -> bool:
    if name in cat:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and cat.get(name[: -len(suffix)]) == "histogram":
            return True
    return False


def dashboard_queries(dashboard: dict):
    """(where, expression) for every query of a dashboard, rows' nested panels included."""
    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                yield f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            yield f"variable {v.get('name')!r}", q


def check_dashboard(path: Path, cat: dict) -> list:
    problems = []
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{path}: {e}"]
    queries = list(dashboard_queries(dashboard))
    if not queries:
        problems.append(f"{path}: no queries found")
    for where, expr in queries:
        names = metric_names(expr)
        if not names:
            problems.append(f"{path}: {where}: names no metric: {expr}")
        for n in names:
            if not known(n, cat):
                problems.append(
                    f"{path}: {where}: {n} is not in docs/metrics.md: {expr}"
                )
    return problems


def check_helm(cat: dict) -> list:
    problems = []
    for path in HELM_VALUES:
        for n in re.findall(r"\bname:\s*[\"']?(moe_[a-z0-9_]+)", path.read_text()):
            if not known(n, cat):
                problems.append(f"{path}: autoscaling metric {n} is not in docs/metrics.md")
    return problems


def self_test():
    """The parser finds what it must, and rejects what it must."""
    expr = (
        'histogram_quantile(0.95, sum by (le, moe_cluster_io_pool) '
        '(rate(moe_x_seconds_bucket{namespace=~"$namespace",kind="gpu"}[$__rate_interval])))'
        ' / on (pod) group_left(device) max(moe_y) offset 5m'
    )
    assert metric_names(expr) == ["moe_x_seconds_bucket", "moe_y"], metric_names(expr)
    assert metric_names("label_values(moe_requests_total, namespace)") == ["moe_requests_total"]
    assert metric_names("sum(rate(moe_a_total[5m])) and bool 1e-3") == ["moe_a_total"]
    cat = catalogue("| `moe_x_seconds` | histogram | s | — | x |\n| `moe_y` | gauge | 1 | — | y |")
    assert known("moe_x_seconds_bucket", cat) and known("moe_y", cat)
    assert not known("moe_y_bucket", cat) and not known("moe_z", cat)


def main(argv):
    self_test()
    cat = catalogue(CATALOGUE.read_text())
    if not cat:
        print(f"check-dashboard: no metrics catalogued in {CATALOGUE}")
        return 1
    paths = [Path(a) for a in argv[1:]] or DASHBOARDS
    problems = []
    for p in paths:
        problems += check_dashboard(p, cat)
    if len(argv) <= 1:
        problems += check_helm(cat)
    for p in problems:
        print(f"check-dashboard: {p}")
    if problems:
        return 1
    print(f"check-dashboard: every query names one of the {len(cat)} catalogued metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
