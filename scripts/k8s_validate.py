#!/usr/bin/env python3
"""Validate Kubernetes manifests offline against the strict JSON schemas bundled in PyPI
kubernetes-validate (1.37.0), reporting every error rather than the first.

    k8s_validate.py [--kube-version 1.27] [--kube-version 1.35] [--allow-kind ServiceMonitor] FILE|DIR|- ...
    k8s_validate.py pools --values helm/moe-cluster/values.yaml [--values EXAMPLE] FILE|-

The first form validates every document (a directory means its *.yaml files, recursively;
kustomization.yaml is skipped) and fails on a kind it has no schema for unless that kind is on the
allow-list (CRD kinds such as ServiceMonitor). The second form checks that every worker pool of the
merged values rendered a Deployment carrying MOE_OFFLOAD (or --offload) and the offload-profile
label. Exit status: 0 clean, 1 findings, 2 usage or environment error.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

try:
    import jsonschema
    import referencing
    import referencing.jsonschema
    import yaml
    import kubernetes_validate
except ImportError as e:  # pragma: no cover - environment problem, not a finding
    print(f"k8s_validate: missing dependency: {e} (pip install kubernetes-validate==1.37.0 jsonschema)",
          file=sys.stderr)
    sys.exit(2)

DEFAULT_VERSIONS = ["1.27", "1.35"]
DEFAULT_ALLOWED = ["ServiceMonitor"]
SCHEMA_ROOT = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
PROFILE_LABEL = "moe-cluster.io/offload-profile"
POOL_LABEL = "moe-cluster.io/pool"


def load_documents(sources):
    """Yield (origin, index, document) for every non-empty YAML document in the sources."""
    for src in sources:
        if src == "-":
            texts = [("<stdin>", sys.stdin.read())]
        else:
            p = Path(src)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*.y*ml") if f.name != "kustomization.yaml")
                texts = [(str(f), f.read_text()) for f in files]
            else:
                texts = [(str(p), p.read_text())]
        for origin, text in texts:
            for i, doc in enumerate(yaml.safe_load_all(text)):
                if doc is not None:
                    yield origin, i, doc


class Validators:
    """One strict Draft 2020-12 validator per (schema dir, kind, apiVersion), built lazily."""

    def __init__(self, version):
        self.dir = SCHEMA_ROOT / f"v{version}.0-local-strict"
        if not self.dir.is_dir():
            raise SystemExit(f"k8s_validate: no strict schemas for Kubernetes {version} in {SCHEMA_ROOT}")
        defs = json.loads((self.dir / "_definitions.json").read_text())
        self.registry = referencing.Resource.from_contents(defs) @ referencing.Registry()
        self.cache = {}

    def get(self, kind, api_version):
        # apps/v1 -> apps-v1, networking.k8s.io/v1 -> networking-v1, v1 -> v1
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        key = (kind, group_version)
        if key not in self.cache:
            path = self.dir / f"{kind.lower()}-{group_version}.json"
            if not path.is_file():
                self.cache[key] = None
            else:
                schema = json.loads(path.read_text())
                registry = referencing.Resource.from_contents(schema) @ self.registry
                self.cache[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self.cache[key]


def describe(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


def validate(args):
    allowed = set(args.allow_kind or DEFAULT_ALLOWED)
    versions = args.kube_version or DEFAULT_VERSIONS
    validators = {v: Validators(v) for v in versions}
    docs = list(load_documents(args.sources))
    errors = 0
    checked = 0
    for origin, index, doc in docs:
        where = f"{origin}[{index}] {describe(doc)}"
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            print(f"ERROR {where}: not a Kubernetes object (no kind/apiVersion)")
            errors += 1
            continue
        if doc["kind"] in allowed:
            checked += 1
            continue
        for version, vs in validators.items():
            validator = vs.get(doc["kind"], doc["apiVersion"])
            if validator is None:
                print(f"ERROR {where}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes "
                      f"{version} (not on the allow-list {sorted(allowed)})")
                errors += 1
                continue
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in err.absolute_path) or "<root>"
                print(f"ERROR {where} (k8s {version}): {path}: {err.message}")
                errors += 1
        checked += 1
    if checked == 0:
        print("ERROR no Kubernetes documents found")
        errors += 1
    if not args.quiet or errors:
        print(f"k8s_validate: {checked} document(s) against Kubernetes {', '.join(versions)} "
              f"(strict): {errors} error(s)")
    return 1 if errors else 0


def expected_pools(values_files):
    """workerPools after Helm's override order (a later file's list replaces the earlier one)."""
    pools = []
    for f in values_files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        if "workerPools" in data:
            pools = data["workerPools"] or []
    return pools


def container_offload(container):
    for env in container.get("env") or []:
        if env.get("name") == "MOE_OFFLOAD":
            return env.get("value")
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    for i, a in enumerate(args):
        if a.startswith("--offload="):
            return a.split("=", 1)[1]
        if a == "--offload" and i + 1 < len(args):
            return args[i + 1]
    return None


def check_pools(args):
    pools = expected_pools(args.values)
    deployments = {}
    for _, _, doc in load_documents(args.sources):
        if isinstance(doc, dict) and doc.get("kind") == "Deployment":
            labels = ((doc.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
            if POOL_LABEL in labels:
                deployments[labels[POOL_LABEL]] = doc
    failures = 0
    for pool in pools:
        name, profile = pool.get("name"), str(pool.get("offload"))
        want_label = profile.replace(":", "-")
        doc = deployments.pop(name, None)
        if doc is None:
            print(f"FAIL pool {name}: no Deployment labelled {POOL_LABEL}={name}")
            failures += 1
            continue
        pod = doc["spec"]["template"]
        problems = []
        for where, labels in (("Deployment", doc["metadata"].get("labels") or {}),
                              ("pod template", pod["metadata"].get("labels") or {})):
            if labels.get(PROFILE_LABEL) != want_label:
                problems.append(f"{where} label {PROFILE_LABEL}={labels.get(PROFILE_LABEL)!r}, want {want_label!r}")
        workers = [c for c in pod["spec"]["containers"] if c.get("name") == "worker"]
        offload = container_offload(workers[0]) if workers else None
        if offload != profile:
            problems.append(f"worker offload {offload!r} (MOE_OFFLOAD or --offload), want {profile!r}")
        if problems:
            print(f"FAIL pool {name}: " + "; ".join(problems))
            failures += 1
        elif not args.quiet:
            print(f"ok   pool {name}: offload {profile}, label {want_label}")
    for name in deployments:
        print(f"FAIL Deployment for pool {name} rendered but not in values")
        failures += 1
    if not pools:
        print("FAIL no worker pools in the values")
        failures += 1
    return 1 if failures else 0


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["pools"]:
        p = argparse.ArgumentParser(prog="k8s_validate.py pools", description=check_pools.__doc__)
        p.add_argument("--values", action="append", required=True,
                       help="values file, in Helm's -f order (chart values.yaml first)")
        p.add_argument("--quiet", "-q", action="store_true")
        p.add_argument("sources", nargs="+", help="rendered manifests: files, directories or -")
        return check_pools(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kube-version", action="append",
                   help=f"Kubernetes minor version(s) to validate against (default {DEFAULT_VERSIONS})")
    p.add_argument("--allow-kind", action="append",
                   help=f"kind accepted without a schema (default {DEFAULT_ALLOWED})")
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    p.add_argument("sources", nargs="+", help="manifest files, directories, or - for stdin")
    return validate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
