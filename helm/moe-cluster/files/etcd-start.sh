#!/bin/sh
# Start-up of a bundled etcd member (helm/moe-cluster, etcd.memberRecovery). Runs inside the etcd
# image through a static busybox; tested by helm/moe-cluster/tests/etcd-member-recovery.sh.
#
#  - The member has data: start etcd as it is (etcd ignores the initial-cluster settings).
#  - No data, and the other members answer with a member list: this member lost its volume (or
#    starts after the others formed the cluster). Remove its stale membership if listed, add it
#    again, and start with --initial-cluster-state existing, so it receives a snapshot instead of
#    crash-looping on raft's "tocommit(N) is out of range".
#  - No data and no member answers: first install (or every member lost its data) — bootstrap
#    a new cluster. If some member still runs but the cluster has no quorum, refuse (exit 1)
#    rather than bootstrap a second cluster under the same name; Kubernetes retries.
#
# Environment: the ETCD_* settings of etcd, of which ETCD_NAME, ETCD_DATA_DIR,
# ETCD_INITIAL_ADVERTISE_PEER_URLS (this member's single peer URL) and ETCD_ADVERTISE_CLIENT_URLS
# are read here; MOE_ETCD_RECOVERY_ENDPOINTS (every member's client URL, comma-separated);
# MOE_ETCD_BIN, MOE_ETCDCTL_BIN (default: etcd, etcdctl on PATH); BUSYBOX (busybox for sleep and
# rm, "" to use PATH); MOE_ETCD_RECOVERY_ATTEMPTS (member list tries, default 5, 2 s apart);
# MOE_ETCD_RECOVERY_RETRIES (tries of each membership change, default 15, 2 s apart). TLS: with
# ETCD_TRUSTED_CA_FILE set, etcdctl verifies with it and presents ETCD_CERT_FILE/ETCD_KEY_FILE.
# With etcd auth on, membership changes need the root user: see docs/operations.md.
set -eu

bb=${BUSYBOX:-}
etcd=${MOE_ETCD_BIN:-etcd}
ctl=${MOE_ETCDCTL_BIN:-etcdctl}
data=${ETCD_DATA_DIR:?}
me=${ETCD_NAME:?}
peer=${ETCD_INITIAL_ADVERTISE_PEER_URLS:?}
attempts=${MOE_ETCD_RECOVERY_ATTEMPTS:-5}
retries=${MOE_ETCD_RECOVERY_RETRIES:-15}

log() { echo "etcd-start[$me]: $*" >&2; }

if [ -d "$data/member/wal" ]; then
  log "data found in $data: starting"
  exec "$etcd"
fi

# The other members' client URLs (this member is not running, so never ask it).
others=""
own=${ETCD_ADVERTISE_CLIENT_URLS:-}
IFS=,
for url in ${MOE_ETCD_RECOVERY_ENDPOINTS:?}; do
  [ "$url" = "$own" ] || others="$others${others:+,}$url"
done
unset IFS
set -- "--endpoints=$others" --dial-timeout=2s --command-timeout=5s
if [ -n "${ETCD_TRUSTED_CA_FILE:-}" ]; then
  set -- "$@" "--cacert=$ETCD_TRUSTED_CA_FILE" "--cert=${ETCD_CERT_FILE:?}" "--key=${ETCD_KEY_FILE:?}"
fi

members=""
i=0
while [ "$i" -lt "$attempts" ]; do
  if members=$("$ctl" "$@" member list -w simple 2>&1); then
    break
  fi
  log "member list failed (attempt $((i + 1))/$attempts): $members"
  members=""
  i=$((i + 1))
  $bb sleep 2
done

if [ -z "$members" ]; then
  if status=$("$ctl" "$@" endpoint status 2>&1); then
    log "no data, and a member runs but the cluster answers no member list (no quorum?):"
    log "$status"
    log "refusing to bootstrap a second cluster; restore quorum or the snapshot (docs/operations.md)"
    exit 1
  fi
  log "no data and no member answers: bootstrapping a new cluster"
  export ETCD_INITIAL_CLUSTER_STATE=new
  exec "$etcd"
fi

# "ID, status, name, peer URLs, client URLs, is learner" per line.
stale=""
while IFS= read -r line; do
  case "$line" in
    *", $peer, "* | *", $peer") stale=${line%%,*} ;;
  esac
done <<MEMBERS
$members
MEMBERS

# retry WHAT CMD...: etcd refuses membership changes until the started members have been
# connected for 5 s ("unhealthy cluster"), e.g. right after another member restarted, and a
# change can time out during a leader election or without quorum: try $retries times, 2 s apart.
# The output is left in $out.
retry() {
  what=$1
  shift
  i=0
  until out=$("$@" 2>&1); do
    i=$((i + 1))
    if [ "$i" -ge "$retries" ]; then
      log "$what failed $i times, giving up (Kubernetes restarts the pod): $out"
      exit 1
    fi
    log "$what failed (attempt $i/$retries), retrying in 2 s: $out"
    $bb sleep 2
  done
}

# remove_stale ETCDCTL-FLAGS...: removes $stale; a removal that timed out may have been applied,
# so a member list without it counts as done.
remove_stale() {
  "$ctl" "$@" member remove "$stale" && return 0
  list=$("$ctl" "$@" member list -w simple) || return 1
  case "$list" in
    "$stale, "* | *"
$stale, "*) return 1 ;;
  esac
}

if [ -n "$stale" ]; then
  log "no data but listed as member $stale: removing it to join again"
  retry "member remove $stale" remove_stale "$@"
fi
retry "member add" "$ctl" "$@" member add "$me" "--peer-urls=$peer"
added=$out
cluster=""
while IFS= read -r line; do
  case "$line" in
    ETCD_INITIAL_CLUSTER=*) cluster=${line#ETCD_INITIAL_CLUSTER=} ;;
  esac
done <<ADDED
$added
ADDED
cluster=${cluster#\"}
cluster=${cluster%\"}
[ -n "$cluster" ] || { log "member add printed no ETCD_INITIAL_CLUSTER: $added"; exit 1; }

$bb rm -rf "$data"
export ETCD_INITIAL_CLUSTER="$cluster"
export ETCD_INITIAL_CLUSTER_STATE=existing
log "added as a new member; joining the existing cluster $cluster"
exec "$etcd"
