#!/usr/bin/env python3
"""Soak benchmark of issue 16 (not a CI test; driven by bench/soak.sh).

Starts a local cluster of real processes (etcd, workers, gateways with the OpenAI HTTP API),
records a greedy reference answer for each fixed prompt, warms up, then runs mixed
INTERACTIVE/BATCH streaming traffic from a few client threads for --duration seconds while a
fault is injected every --fault-every seconds in rotation:

  worker-kill      SIGKILL a worker, start it again at once (same id, port, flags)
  gateway-restart  SIGTERM a gateway (it drains), start it again on the same ports
  etcd-stall       SIGSTOP etcd for --stall seconds, then SIGCONT

Worker w0 and gateway g0 are never faulted, so their RSS covers the whole run; the faults rotate
over the others (w1, w2, g1). Every request is classified:

  completed   the stream ended with a finish_reason and [DONE]
  cancelled   the client closed the connection mid-stream on purpose
  refused     an HTTP error status before the stream started, or the TCP connect was refused
              (the gateway was restarting): the client knows the request was not served
  errored     the stream started and ended with an {"error": ...} event (a clear status)
  lost        anything else: the stream ended without [DONE] or error event, the connection was
              reset without a status, or nothing arrived before the deadline (must be 0)

Greedy (temperature 0) requests use a fixed prompt set; their text must equal the reference
recorded before the faults (for a client-cancelled one: be a prefix of it), else `corrupted`.

Python 3 standard library only. Writes requests.jsonl, faults.jsonl, rss.csv, summary.json and
the process logs into --outdir, and a Markdown report to --doc.
"""

import argparse
import base64
import datetime
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1969, the first humans",
    "A healthy breakfast usually includes",
    "The quick brown fox",
]
# Greedy prompt i generates greedy_max_tokens(i) tokens: even numbers, one per prompt, while sampled
# requests ask for odd ones, so a gateway's "migrating stream" log line (which names the class
# and max_tokens, not the request) can be matched to its request.


def greedy_max_tokens(pi):
    return 24 + 2 * pi
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

WORDS = (
    "river mountain city winter garden engine library music ocean forest market history "
    "science bridge dream window letter morning journey island castle machine story light"
).split()
TEMPLATES = [
    "Write a short note about the {a} and the {b}.",
    "Describe a {a} near a {b} in two sentences.",
    "List three facts about the {a}.",
    "The {a} was quiet until the {b}",
    "Explain why a {a} needs a {b}.",
]


def now():
    return time.monotonic()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """One cluster process that can be signalled, killed and started again with the same args."""

    def __init__(self, role, cmd, logdir, env=None):
        self.role = role
        self.cmd = cmd
        self.logdir = logdir
        self.env = dict(os.environ, **(env or {}))
        self.popen = None
        self.starts = 0
        self.first_pid = None

    def start(self):
        self.starts += 1
        logf = open(os.path.join(self.logdir, f"{self.role}.log"), "ab")
        logf.write(f"\n==== start #{self.starts} at {time.strftime('%H:%M:%S')}: {' '.join(self.cmd)}\n".encode())
        logf.flush()
        self.popen = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        logf.close()
        if self.first_pid is None:
            self.first_pid = self.popen.pid

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, grace=40.0):
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if not self.alive():
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def kill(self):
        self.popen.kill()
        return self.popen.wait()

    def rss_kib(self):
        """(VmRSS, RssAnon) in KiB, or (None, None)."""
        vals = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "RssAnon"):
                        vals[k] = int(v.split()[0])
        except (OSError, TypeError):
            return None, None
        return vals.get("VmRSS"), vals.get("RssAnon")


class Cluster:
    def __init__(self, args):
        self.args = args
        self.logdir = os.path.join(args.outdir, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.prefix = f"/soak-{os.getpid()}/"
        self.etcd_port, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        bin_ = args.bin
        peer_url = f"http://127.0.0.1:{peer}"
        self.etcd = Proc(
            "etcd",
            [args.etcd, "--name", "soak", "--data-dir", os.path.join(args.outdir, "etcd-data"),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"soak={peer_url}",
             # as the chart's etcd (helm values etcd.autoCompactionRetention)
             "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m"]
            + (["--snapshot-count", str(args.etcd_snapshot_count)] if args.etcd_snapshot_count else []),
            self.logdir,
        )
        env = {"RUST_LOG": args.rust_log, "OMP_WAIT_POLICY": "PASSIVE"}
        profiles = args.profiles.split(",")
        self.workers = []
        self.worker_metrics = []
        for i, prof in enumerate(profiles):
            port, metrics = free_port(), free_port()
            self.worker_metrics.append(metrics)
            self.workers.append(Proc(
                f"w{i}",
                [os.path.join(bin_, "moe-worker"), "--model", args.model, "--offload", prof,
                 "--id", f"w{i}", "--listen", f"127.0.0.1:{port}", "--etcd", self.etcd_url,
                 "--metrics-listen", f"127.0.0.1:{metrics}",
                 "--etcd-prefix", self.prefix, "--ctx-size", str(args.ctx_size),
                 "--parallel", str(args.parallel), "--threads", str(args.threads)],
                self.logdir, env))
        self.gateways = []
        self.http_ports = []
        self.metrics_ports = []
        for i in range(args.gateways):
            grpc, http_, metrics = free_port(), free_port(), free_port()
            self.http_ports.append(http_)
            self.metrics_ports.append(metrics)
            self.gateways.append(Proc(
                f"g{i}",
                [os.path.join(bin_, "moe-gateway"), "--listen", f"127.0.0.1:{grpc}",
                 "--http-listen", f"127.0.0.1:{http_}", "--metrics-listen", f"127.0.0.1:{metrics}",
                 "--etcd", self.etcd_url, "--etcd-prefix", self.prefix],
                self.logdir, env))

    def procs(self):
        return [self.etcd] + self.workers + self.gateways

    def etcd_adverts(self):
        """{worker id: state} from the registry, through etcd's JSON gateway."""
        key = self.prefix + "workers/"
        end = key[:-1] + chr(ord(key[-1]) + 1)
        body = json.dumps({
            "key": base64.b64encode(key.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        }).encode()
        req = urllib.request.Request(f"{self.etcd_url}/v3/kv/range", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            reply = json.load(r)
        self.revision = int(reply.get("header", {}).get("revision", 0))
        kvs = reply.get("kvs", [])
        out = {}
        for kv in kvs:
            adv = json.loads(base64.b64decode(kv["value"]))
            out[adv.get("id")] = {"state": adv.get("state"), "lease": kv.get("lease"),
                                  "active": adv.get("load", {}).get("active", 0),
                                  "version": int(kv.get("version", 0)),
                                  "create_revision": int(kv.get("create_revision", 0))}
        return out

    def wait_ready(self, ids, limit, not_lease=None):
        """Until every worker in `ids` has a `ready` advert (under another lease than `not_lease`:
        a SIGKILLed worker's old advert stays until its lease expires)."""
        deadline = now() + limit
        while now() < deadline:
            for p in self.procs():
                if not p.alive():
                    raise RuntimeError(f"{p.role} exited (code {p.popen.returncode}); see {self.logdir}")
            try:
                adv = self.etcd_adverts()
                if all(i in adv and adv[i]["state"] == "ready" and adv[i]["lease"] != not_lease for i in ids):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"workers {ids} not ready within {limit}s")

    def gateway_healthy(self, i):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_gateway(self, i, limit):
        deadline = now() + limit
        while now() < deadline:
            if not self.gateways[i].alive():
                raise RuntimeError(f"g{i} exited; see {self.logdir}")
            if self.gateway_healthy(i):
                return
            time.sleep(0.25)
        raise RuntimeError(f"g{i} not healthy within {limit}s")

    def start(self):
        self.etcd.start()
        deadline = now() + 30
        while True:
            try:
                self.etcd_adverts()
                break
            except OSError:
                if now() > deadline:
                    raise RuntimeError("etcd did not answer")
                time.sleep(0.2)
        for w in self.workers:
            w.start()
        for g in self.gateways:
            g.start()
        self.wait_ready([f"w{i}" for i in range(len(self.workers))], self.args.start_timeout)
        for i in range(len(self.gateways)):
            self.wait_gateway(i, 60)

    def stop(self):
        for p in self.gateways + self.workers:
            if p.alive():
                p.signal(signal.SIGCONT)
        for p in self.gateways + self.workers:
            p.stop()
        self.etcd.signal(signal.SIGCONT)
        self.etcd.stop()

    def worker_active(self, w):
        """Sequences in worker `w`'s batch now, from its /metrics (None when it does not answer)."""
        v = self.metric_sum("moe_worker_active_sequences", [self.worker_metrics[self.workers.index(w)]])
        return v

    def metric_sum(self, name, ports=None):
        """Sum of a metric's samples over the endpoints that answer (None when none does);
        the gateways' by default. A restarted process's counters start again at 0."""
        total = None
        for port in self.metrics_ports if ports is None else ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
                    total = total or 0.0
                    for line in r.read().decode().splitlines():
                        if line.startswith(name) and not line.startswith("#"):
                            head = line.split(" ")[0]
                            if head == name or head.startswith(name + "{"):
                                total += float(line.rsplit(" ", 1)[1])
            except OSError:
                pass
        return total


# ---------------------------------------------------------------------------------------------
# Requests


def stream_completion(port, body, cls, cancel_after, deadline_s, read_timeout):
    """One streamed /v1/completions request. Returns a dict with outcome, status, text, ttft."""
    t0 = now()
    res = {"status": None, "text": "", "ttft": None, "finish": None, "chunks": 0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=read_timeout)
    try:
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {
                "content-type": "application/json",
                "x-moe-latency-class": cls,
                "connection": "close",
            })
        except ConnectionRefusedError:
            res.update(outcome="refused", status="connect-refused")
            return res
        resp = conn.getresponse()
        res["status"] = resp.status
        if resp.status != 200:
            raw = resp.read()
            try:
                res["error"] = json.loads(raw)["error"]["message"][:200]
            except (ValueError, KeyError, TypeError):
                res["error"] = raw[:200].decode(errors="replace")
            res["outcome"] = "refused"
            return res
        done = False
        while True:
            if now() - t0 > deadline_s:
                res.update(outcome="lost", reason=f"past the {deadline_s}s deadline")
                return res
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line or line.startswith(b":") or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                res.update(outcome="errored", error=str(ev["error"].get("message"))[:200],
                           status=f"stream-error:{ev['error'].get('code')}")
                return res
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    if res["ttft"] is None:
                        res["ttft"] = now() - t0
                    res["text"] += ch["text"]
                    res["chunks"] += 1
                if ch.get("finish_reason"):
                    res["finish"] = ch["finish_reason"]
            if cancel_after is not None and res["chunks"] >= cancel_after and res["finish"] is None:
                res["outcome"] = "cancelled"
                return res  # closing the connection cancels the stream
        if done and res["finish"]:
            res["outcome"] = "completed"
        else:
            res.update(outcome="lost", reason="stream ended without [DONE] or error event"
                       if not done else "[DONE] without finish_reason")
        return res
    except socket.timeout:
        res.update(outcome="lost", reason=f"no byte for {read_timeout}s")
        return res
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        res.update(outcome="lost", reason=f"transport error without status: {type(e).__name__}: {e}")
        return res
    finally:
        res["elapsed"] = now() - t0
        conn.close()


class Load:
    def __init__(self, args, cluster, reference):
        self.args = args
        self.cluster = cluster
        self.reference = reference
        self.lock = threading.Lock()
        self.records = []
        self.phase = "warmup"
        self.t_measure = None
        self.stop_flag = threading.Event()
        self.seq = 0
        self.out = open(os.path.join(args.outdir, "requests.jsonl"), "w")

    def next_id(self):
        with self.lock:
            self.seq += 1
            return self.seq

    def client(self, cls, seed):
        rng = random.Random(seed)
        a = self.args
        while not self.stop_flag.is_set():
            greedy = rng.random() < a.greedy_fraction
            cancel = rng.random() < a.cancel_fraction
            if greedy:
                pi = rng.randrange(len(GREEDY_PROMPTS))
                body = {"prompt": GREEDY_PROMPTS[pi], "max_tokens": greedy_max_tokens(pi),
                        "temperature": 0, "stream": True}
                max_tokens = greedy_max_tokens(pi)
            else:
                pi = None
                max_tokens = rng.randrange(a.min_tokens | 1, a.max_tokens + 1, 2)
                body = {"prompt": rng.choice(TEMPLATES).format(a=rng.choice(WORDS), b=rng.choice(WORDS)),
                        "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": rng.randrange(1 << 31), "stream": True}
            cancel_after = rng.randint(2, max(2, max_tokens // 2)) if cancel else None
            gw = rng.randrange(len(self.cluster.gateways))
            rid = self.next_id()
            t_send = time.time()
            phase = self.phase
            res = stream_completion(self.cluster.http_ports[gw], body, cls, cancel_after,
                                    a.deadline, a.read_timeout)
            rec = {"id": rid, "phase": phase, "t": round(t_send, 3), "class": cls, "gateway": f"g{gw}",
                   "greedy": greedy, "prompt": pi, "max_tokens": max_tokens,
                   "cancel_after": cancel_after, **res}
            if greedy and res["outcome"] in ("completed", "cancelled"):
                ref = self.reference[pi]
                ok = res["text"] == ref if res["outcome"] == "completed" else ref.startswith(res["text"])
                rec["corrupted"] = not ok
                if not ok:
                    rec["reference"] = ref
            rec["elapsed"] = round(rec["elapsed"], 3)
            if rec["ttft"] is not None:
                rec["ttft"] = round(rec["ttft"], 4)
            with self.lock:
                self.records.append(rec)
                self.out.write(json.dumps(rec) + "\n")
                self.out.flush()
            if rec["outcome"] in ("lost",) or (rec.get("corrupted")):
                log(f"!! request {rid} {rec['outcome']} corrupted={rec.get('corrupted')} {rec.get('reason', '')}")
            if res["outcome"] in ("refused", "errored"):
                time.sleep(1.0)  # the gateway's retry-after
            else:
                time.sleep(rng.uniform(a.think_min, a.think_max))

    def run_threads(self):
        self.threads = []
        for i in range(self.args.interactive_clients):
            self.threads.append(threading.Thread(target=self.client, args=("interactive", 1000 + i), daemon=True))
        for i in range(self.args.batch_clients):
            self.threads.append(threading.Thread(target=self.client, args=("batch", 2000 + i), daemon=True))
        for t in self.threads:
            t.start()

    def join(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.args.deadline + 30)
        hung = [t for t in self.threads if t.is_alive()]
        self.out.close()
        return len(hung)


def record_reference(cluster, args):
    """Each fixed prompt, greedy, on an idle cluster, through g0 in both classes (twice each)."""
    ref = {}
    disagreements = []
    for pi, prompt in enumerate(GREEDY_PROMPTS):
        texts = []
        for cls in ("interactive", "batch", "interactive", "batch"):
            body = {"prompt": prompt, "max_tokens": greedy_max_tokens(pi), "temperature": 0, "stream": True}
            r = stream_completion(cluster.http_ports[0], body, cls, None, args.deadline, args.read_timeout)
            if r["outcome"] != "completed":
                raise RuntimeError(f"reference request for prompt {pi} ({cls}) {r['outcome']}: {r}")
            texts.append(r["text"])
        ref[pi] = texts[0]
        if len(set(texts)) != 1:
            disagreements.append({"prompt": pi, "texts": texts})
    return ref, disagreements


# ---------------------------------------------------------------------------------------------
# Faults and RSS


class Faults:
    KINDS = ["worker-kill", "gateway-restart", "etcd-stall"]

    def __init__(self, args, cluster, load):
        self.args = args
        self.cluster = cluster
        self.load = load
        self.events = []
        self.n = 0
        self.worker_targets = cluster.workers[1:] or cluster.workers
        self.gateway_targets = cluster.gateways[1:] or cluster.gateways

    def inject(self):
        kind = self.KINDS[self.n % len(self.KINDS)]
        round_ = self.n // len(self.KINDS)
        self.n += 1
        ev = {"n": self.n, "kind": kind, "t": round(time.time(), 3),
              "at_s": round(now() - self.load.t_measure, 1)}
        t0 = now()
        if kind == "worker-kill":
            # Kill one mid-stream: wait (up to 30 s) until a faulted worker's /metrics shows a
            # running sequence; the one whose turn it is when both do (or when none does).
            k = len(self.worker_targets)
            order = [self.worker_targets[(round_ + j) % k] for j in range(k)]
            w, active, until = order[0], 0, now() + 30
            while now() < until:
                busy = [(c, self.cluster.worker_active(c) or 0) for c in order]
                busy = [(c, a) for c, a in busy if a]
                if busy:
                    w, active = busy[0]
                    break
                time.sleep(0.05)
            try:
                lease = self.cluster.etcd_adverts().get(w.role, {}).get("lease")
            except OSError:
                lease = None
            ev["target"] = w.role
            ev["old_pid"] = w.pid
            ev["active_at_kill"] = int(active)
            t0 = now()
            w.kill()
            w.start()
            ev["new_pid"] = w.pid
            self.cluster.wait_ready([w.role], self.args.start_timeout, not_lease=lease)
            ev["recovered_s"] = round(now() - t0, 1)
            ev["recovered"] = "worker advert ready again"
        elif kind == "gateway-restart":
            g = self.gateway_targets[round_ % len(self.gateway_targets)]
            i = self.cluster.gateways.index(g)
            ev["target"] = g.role
            ev["old_pid"] = g.pid
            ev["exit_code"] = g.stop()
            ev["drained_s"] = round(now() - t0, 1)
            g.start()
            ev["new_pid"] = g.pid
            self.cluster.wait_gateway(i, 60)
            ev["recovered_s"] = round(now() - t0, 1)
            ev["recovered"] = "gateway /health 200 again"
        else:
            ev["target"] = "etcd"
            self.cluster.etcd.signal(signal.SIGSTOP)
            time.sleep(self.args.stall)
            self.cluster.etcd.signal(signal.SIGCONT)
            ev["recovered_s"] = round(now() - t0, 1)
            ev["recovered"] = f"SIGCONT after {self.args.stall}s"
        log(f"fault {ev}")
        self.events.append(ev)


MIGRATION_RE = re.compile(
    r"^(\S+Z) .*gateway\.request\{class=\"(\w+)\" max_tokens=(\d+)\}.*migrating stream worker=(\S+) tokens=(\d+)")


def match_migrations(cluster, records):
    """Marks the requests whose stream a gateway migrated, from its "migrating stream" log lines
    (they name the class and max_tokens, not the request): a line matches the request of that
    gateway, class and max_tokens that was in flight then. Returns the number of such lines."""
    lines = ambiguous = 0
    for g in cluster.gateways:
        with open(os.path.join(cluster.logdir, f"{g.role}.log"), errors="replace") as f:
            for line in f:
                m = MIGRATION_RE.match(ANSI_RE.sub("", line))
                if not m:
                    continue
                lines += 1
                ts = datetime.datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
                cands = [r for r in records if r["gateway"] == g.role and r["class"] == m[2]
                         and r["max_tokens"] == int(m[3]) and r["t"] - 0.5 <= ts <= r["t"] + r["elapsed"] + 0.5]
                if len(cands) == 1:
                    cands[0].setdefault("migrations", []).append({"to": m[4], "after_tokens": int(m[5])})
                else:
                    ambiguous += 1
                    cands_ids = [r["id"] for r in cands]
                    log(f"migration at {m[1]} on {g.role} matches requests {cands_ids}")
                    for r in cands:
                        r["migration_ambiguous"] = True
    return lines, ambiguous


ETCD_METRICS = [
    "etcd_mvcc_put_total",
    "etcd_server_proposals_committed_total",
    "etcd_debugging_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_debugging_mvcc_keys_total",
    "go_memstats_heap_inuse_bytes",
    "go_memstats_heap_alloc_bytes",
    "go_memstats_heap_sys_bytes",
    "go_memstats_heap_released_bytes",
    "go_memstats_sys_bytes",
    "go_goroutines",
    "process_resident_memory_bytes",
]


def etcd_metrics(cluster):
    """The ETCD_METRICS values from etcd's /metrics (None each when it does not answer)."""
    vals = dict.fromkeys(ETCD_METRICS)
    try:
        with urllib.request.urlopen(f"{cluster.etcd_url}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return vals
    for line in text.splitlines():
        name, _, v = line.partition(" ")
        if name in vals:
            try:
                vals[name] = float(v)
            except ValueError:
                pass
    return vals


def advert_writes(cluster, seen):
    """Advert puts per worker since the last call: a key's version counts its puts since it was
    created (a new lease after a kill re-creates it). `seen` holds (create_revision, version)."""
    out = {}
    try:
        adv = cluster.etcd_adverts()
    except OSError:
        return out
    for wid, a in adv.items():
        prev = seen.get(wid)
        if prev and prev[0] == a["create_revision"]:
            out[wid] = a["version"] - prev[1]
        else:
            out[wid] = a["version"]
        seen[wid] = (a["create_revision"], a["version"])
    return out


def rss_snapshot(cluster):
    snap = {}
    for p in cluster.procs():
        rss, anon = p.rss_kib()
        snap[p.role] = {"pid": p.pid, "rss_kib": rss, "anon_kib": anon, "starts": p.starts}
    return snap


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ms(x):
    return "–" if x is None else f"{x * 1000:.0f}"


def fmt_mib(kib):
    return "–" if kib is None else f"{kib / 1024:.1f}"


def report(args, cluster, load, faults, ref_info, rss_start, rss_end, extra):
    recs = [r for r in load.records if r["phase"] == "measure"]
    warm = [r for r in load.records if r["phase"] == "warmup"]
    out = []
    w = out.append

    def counts(rs):
        c = {"sent": len(rs)}
        for k in ("completed", "cancelled", "refused", "errored", "lost"):
            c[k] = sum(1 for r in rs if r["outcome"] == k)
        c["greedy_checked"] = sum(1 for r in rs if "corrupted" in r)
        c["corrupted"] = sum(1 for r in rs if r.get("corrupted"))
        return c

    tot = counts(recs)
    w("## Results")
    w("")
    w(f"Measured phase: {extra['measured_s']} s with faults (--duration {args.duration}; a fault that waits "
      f"for its worker to hold a stream or to come back can run past it), after {args.warmup} s of warm-up "
      f"traffic without faults, whose {len(warm)} requests are not counted below ("
      + ", ".join(f"{k} {v}" for k, v in counts(warm).items()) + ").")
    w("")
    w("| class | sent | completed | cancelled by client | refused | errored mid-stream | **lost** | greedy checked | **corrupted** |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cls in ("interactive", "batch", None):
        c = counts([r for r in recs if cls is None or r["class"] == cls]) if cls else tot
        w(f"| {cls or '**all**'} | {c['sent']} | {c['completed']} | {c['cancelled']} | {c['refused']} | "
          f"{c['errored']} | {c['lost']} | {c['greedy_checked']} | {c['corrupted']} |")
    w("")
    statuses = {}
    for r in recs:
        if r["outcome"] in ("refused", "errored"):
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    w("Refusals and errors by status: " + (", ".join(f"`{k}` × {v}" for k, v in sorted(statuses.items()))
                                            or "none") + ".")
    msgs = {}
    for r in recs:
        if r["outcome"] in ("refused", "errored") and r.get("error"):
            key = f"{r['status']}: {r['error'][:120]}"
            msgs[key] = msgs.get(key, 0) + 1
    for k, v in sorted(msgs.items(), key=lambda kv: -kv[1])[:8]:
        w(f"- {v} × {k}")
    w("")
    bad = [r for r in recs if r["outcome"] == "lost" or r.get("corrupted")]
    if bad:
        w("Lost or corrupted requests (all of them, up to 20):")
        w("")
        for r in bad[:20]:
            w(f"- #{r['id']} {r['class']} via {r['gateway']} at {time.strftime('%H:%M:%S', time.gmtime(r['t']))}Z: "
              f"{r['outcome']}{' CORRUPTED' if r.get('corrupted') else ''} {r.get('reason', '')}; "
              f"text {json.dumps(r['text'][:80])}"
              + (f" vs reference {json.dumps(r.get('reference', '')[:80])}" if r.get("corrupted") else ""))
        w("")
    mig = [r for r in recs if r.get("migrations")]
    mig_greedy = [r for r in mig if "corrupted" in r]
    w(f"Migrations: the gateway logs say \"migrating stream\" {extra['migrating_lines']} times in all (warm-up "
      f"included; `moe_migrations_total` of the gateways at the end: {extra['migrations']:.0f}, reset by "
      f"restarts). Matched to requests of the measured phase by gateway, class, max_tokens and time: "
      f"{len(mig)} migrated streams ({sum(1 for r in mig if r['outcome'] == 'completed')} completed, "
      f"{sum(1 for r in mig if r['outcome'] == 'cancelled')} cancelled by the client, "
      f"{sum(1 for r in mig if r['outcome'] not in ('completed', 'cancelled'))} other), of which "
      f"{len(mig_greedy)} greedy ones were checked against the reference: "
      f"{sum(1 for r in mig_greedy if r['corrupted'])} corrupted; "
      f"{extra['ambiguous_lines']} log lines matched more than one request; their "
      f"{sum(1 for r in recs if r.get('migration_ambiguous'))} candidate requests include "
      f"{sum(1 for r in recs if r.get('migration_ambiguous') and r['outcome'] == 'lost')} lost and "
      f"{sum(1 for r in recs if r.get('migration_ambiguous') and r.get('corrupted'))} corrupted ones.")
    w("")

    w("### Faults")
    w("")
    w("| # | at (s) | fault | target | recovery | note |")
    w("| ---: | ---: | --- | --- | ---: | --- |")
    for ev in faults.events:
        note = ev["recovered"]
        if ev["kind"] == "gateway-restart":
            note += f"; drained and exited with code {ev['exit_code']} in {ev['drained_s']} s"
        if "active_at_kill" in ev:
            note += f"; {ev['active_at_kill']} running sequences when killed"
        if "old_pid" in ev:
            note += f"; pid {ev['old_pid']} → {ev['new_pid']}"
        w(f"| {ev['n']} | {ev['at_s']} | {ev['kind']} | {ev['target']} | {ev['recovered_s']} s | {note} |")
    w("")

    w("### TTFT per 5-minute window")
    w("")
    w("Time from sending the request to the first text chunk, in ms, over the streams that produced "
      "text (completed and client-cancelled ones); windows count from the start of the measured phase.")
    w("")
    w("| window | class | streams | TTFT p50 | TTFT p99 | max | faults in window |")
    w("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    win = args.window
    measured = extra["measured_s"]
    nwin = max(1, -(-measured // win))
    t_measure_wall = extra["t_measure_wall"]
    for k in range(nwin):
        lo, hi = k * win, min((k + 1) * win, measured)
        fl = ", ".join(ev["kind"] for ev in faults.events if lo <= ev["at_s"] < hi) or "none"
        for cls in ("interactive", "batch"):
            xs = [r["ttft"] for r in recs if r["class"] == cls and r["ttft"] is not None
                  and lo <= r["t"] - t_measure_wall < hi]
            w(f"| {lo / 60:g}–{hi / 60:g} min | {cls} | {len(xs)} | {fmt_ms(pct(xs, 50))} | {fmt_ms(pct(xs, 99))} | "
              f"{fmt_ms(max(xs) if xs else None)} | {fl if cls == 'interactive' else ''} |")
    w("")

    w("### RSS")
    w("")
    w("VmRSS (and anonymous RSS) in MiB after warm-up and at the end. A process restarted by a fault "
      "is a new process: its end value is not comparable with its start value (growth shown only "
      "for processes that ran the whole time).")
    w("")
    late = 300
    w(f"The last three columns: the process's largest sampled RSS, and its RSS {late // 60} minutes into the "
      "measured phase (after its first 5-minute compaction for etcd) with the growth from there to the end.")
    w("")
    w("| process | pid start → end | starts | RSS start | RSS end | growth | anon start | anon end | anon growth "
      f"| RSS max | RSS at {late // 60} min | growth from there |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    samples = extra.get("rss_samples", [])
    for role in rss_start:
        a, b = rss_start[role], rss_end[role]
        same = a["pid"] == b["pid"]
        mine = [x for x in samples if x[1] == role and x[2] == b["pid"] and x[3] is not None]
        peak = max([x[3] for x in mine] + [b["rss_kib"] or 0]) if same else None
        at_late = next((x[3] for x in mine if x[0] >= late), None) if same else None
        late_growth = ("n/a (restarted)" if not same else "–" if at_late is None or b["rss_kib"] is None
                       else f"{(b['rss_kib'] - at_late) / at_late * 100:+.1f} %")

        def growth(x, y):
            if not same or x is None or y is None:
                return "n/a (restarted)" if not same else "–"
            return f"{(y - x) / x * 100:+.1f} %"

        w(f"| {role} | {a['pid']} → {b['pid']} | {b['starts']} | {fmt_mib(a['rss_kib'])} | {fmt_mib(b['rss_kib'])} | "
          f"{growth(a['rss_kib'], b['rss_kib'])} | {fmt_mib(a['anon_kib'])} | {fmt_mib(b['anon_kib'])} | "
          f"{growth(a['anon_kib'], b['anon_kib'])} | {fmt_mib(peak)} | {fmt_mib(at_late)} | {late_growth} |")
    w("")
    w(f"RSS sampled every {args.rss_every} s in `rss.csv` of the output directory. etcd's revision went from "
      f"{extra['etcd_rev'][0]} to {extra['etcd_rev'][1]} during the measured phase (every advert write is a "
      "revision; etcd runs with the chart's periodic auto-compaction, 5 min retention, so its history "
      "is compacted every 5 minutes of a 30-minute run).")
    w("")
    m0, m1 = extra["etcd_metrics"]
    writes = extra["advert_writes"]
    secs = max(1, measured)
    w("etcd during the measured phase (its `/metrics` at start and end, sampled every "
      f"{args.rss_every} s into `etcd_metrics.csv`; advert writes per worker from each key's etcd "
      "`version`, counted across re-registrations):")
    w("")
    w("| measure | start | end | change |")
    w("| --- | ---: | ---: | ---: |")
    for k, label, scale, unit in (
        ("etcd_mvcc_put_total", "puts", 1, ""),
        ("etcd_server_proposals_committed_total", "raft proposals committed", 1, ""),
        ("go_memstats_heap_inuse_bytes", "Go heap in use", 1 / 1048576, " MiB"),
        ("go_memstats_heap_sys_bytes", "Go heap reserved", 1 / 1048576, " MiB"),
        ("go_memstats_heap_released_bytes", "Go heap returned to the OS", 1 / 1048576, " MiB"),
        ("go_memstats_sys_bytes", "all memory the Go runtime took from the OS", 1 / 1048576, " MiB"),
        ("etcd_debugging_mvcc_db_total_size_in_bytes", "bbolt file", 1 / 1048576, " MiB"),
        ("etcd_mvcc_db_total_size_in_use_in_bytes", "bbolt in use", 1 / 1048576, " MiB"),
        ("go_goroutines", "goroutines", 1, ""),
    ):
        a, b = m0.get(k), m1.get(k)
        if a is None or b is None:
            w(f"| {label} | – | – | – |")
            continue
        f = (lambda x: f"{x * scale:.1f}{unit}") if scale != 1 else (lambda x: f"{x:.0f}")
        w(f"| {label} | {f(a)} | {f(b)} | {f(b - a)} |")
    w("")
    total = sum(writes.values())
    w(f"Advert writes: {total} in {secs} s = {total / secs:.2f}/s for {len(writes)} workers ("
      + ", ".join(f"{i} {n} = {n / secs:.2f}/s" for i, n in writes.items()) + ").")
    w("")
    w("### Reference")
    w("")
    w(f"{len(GREEDY_PROMPTS)} fixed prompts, {greedy_max_tokens(0)}–{greedy_max_tokens(len(GREEDY_PROMPTS) - 1)} greedy tokens, recorded on the idle "
      "cluster before warm-up through g0, twice as interactive and twice as batch: "
      + ("all four runs agreed for every prompt." if not ref_info else
         f"runs DISAGREED for {len(ref_info)} prompts (the first run is the reference): "
         + json.dumps(ref_info)[:600]))
    w("")
    return "\n".join(out), tot


def machine_md(args):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1048576
    return [
        f"- machine: `{' '.join(os.uname())}`",
        f"- CPU: {cpu}, `nproc` = {os.cpu_count()}, memory {mem:.1f} GiB",
        f"- cluster: etcd, {len(args.profiles.split(','))} workers (`{args.profiles}`; `--parallel {args.parallel}"
        f" --ctx-size {args.ctx_size} --threads {args.threads}`, other flags default), {args.gateways} gateways "
        "(`--http-listen`, other flags default); all on 127.0.0.1; `RUST_LOG=" + args.rust_log + "`",
        f"- traffic: {args.interactive_clients} interactive + {args.batch_clients} batch client threads, each "
        f"sending one streamed `/v1/completions` at a time to a random gateway, {args.think_min}–{args.think_max} s "
        f"apart (1 s after a refusal); {args.greedy_fraction:.0%} greedy ({len(GREEDY_PROMPTS)} fixed prompts, "
        f"{greedy_max_tokens(0)}–{greedy_max_tokens(len(GREEDY_PROMPTS) - 1)} tokens), the rest temperature 0.8 "
        f"with an odd number of tokens in {args.min_tokens}–{args.max_tokens}; "
        f"{args.cancel_fraction:.0%} closed by the client mid-stream; client deadline {args.deadline:.0f} s, "
        f"longest silence {args.read_timeout:.0f} s",
        f"- faults: every {args.fault_every} s in rotation worker-kill (SIGKILL w1 or w2, whichever runs a stream, "
        "alternating when both or neither do within 30 s; restarted at once), "
        f"gateway-restart (SIGTERM g1, wait for exit, start again), etcd-stall (SIGSTOP {args.stall:.0f} s); "
        "w0 and g0 are never faulted",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="directory holding moe-worker and moe-gateway")
    ap.add_argument("--model", required=True)
    ap.add_argument("--etcd", default="etcd")
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--doc", required=True, help="Markdown report to write")
    ap.add_argument("--header", default="", help="file whose text opens the report (setup, command)")
    ap.add_argument("--duration", type=int, default=1800, help="measured seconds with faults")
    ap.add_argument("--warmup", type=int, default=60, help="seconds of traffic before RSS start and faults")
    ap.add_argument("--fault-every", type=int, default=120)
    ap.add_argument("--stall", type=float, default=10.0, help="seconds etcd stays SIGSTOPped")
    ap.add_argument("--window", type=int, default=300, help="TTFT window in seconds")
    ap.add_argument("--profiles", default="full,cpu-moe,full", help="offload profile of each worker")
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--interactive-clients", type=int, default=2)
    ap.add_argument("--batch-clients", type=int, default=2)
    ap.add_argument("--greedy-fraction", type=float, default=0.4)
    ap.add_argument("--cancel-fraction", type=float, default=0.15)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--think-min", type=float, default=0.2)
    ap.add_argument("--think-max", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=120.0, help="client deadline per request (s)")
    ap.add_argument("--read-timeout", type=float, default=60.0, help="longest silence on a stream (s)")
    ap.add_argument("--start-timeout", type=float, default=240.0, help="for a worker to become ready")
    ap.add_argument("--rss-every", type=int, default=30)
    ap.add_argument("--etcd-snapshot-count", type=int, default=0,
                    help="etcd --snapshot-count (0: etcd's default); bench/soak.sh passes the chart's")
    ap.add_argument("--rust-log", default="info")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)

    cluster = Cluster(args)
    log(f"starting cluster: etcd {cluster.etcd_url}, {len(cluster.workers)} workers, "
        f"{len(cluster.gateways)} gateways (http ports {cluster.http_ports}); logs in {cluster.logdir}")
    rc = 1
    try:
        t_up = now()
        cluster.start()
        log(f"cluster ready in {now() - t_up:.1f}s; recording the greedy reference")
        reference, disagreements = record_reference(cluster, args)
        with open(os.path.join(args.outdir, "reference.json"), "w") as f:
            json.dump({"prompts": GREEDY_PROMPTS, "reference": reference, "disagreements": disagreements}, f, indent=1)
        if disagreements:
            log(f"reference runs disagree: {disagreements}")

        load = Load(args, cluster, reference)
        faults = Faults(args, cluster, load)
        load.run_threads()
        log(f"warm-up {args.warmup}s")
        time.sleep(args.warmup)
        rss_start = rss_snapshot(cluster)
        cluster.etcd_adverts()
        rev_start = cluster.revision
        load.phase = "measure"
        load.t_measure = now()
        t_measure_wall = time.time()
        log(f"measuring {args.duration}s, a fault every {args.fault_every}s; RSS at start {rss_start}")

        rss_csv = open(os.path.join(args.outdir, "rss.csv"), "w")
        rss_csv.write("t_s,process,pid,rss_kib,anon_kib\n")
        etcd_csv = open(os.path.join(args.outdir, "etcd_metrics.csv"), "w")
        wids = [w.role for w in cluster.workers]
        etcd_csv.write("t_s," + ",".join(ETCD_METRICS) + "," + ",".join(f"puts_{i}" for i in wids) + "\n")
        rss_samples = []
        etcd_start = etcd_metrics(cluster)
        seen = {}
        advert_writes(cluster, seen)
        writes = {i: 0 for i in wids}

        def rss_sampler():
            while not load.stop_flag.is_set():
                t = round(now() - load.t_measure, 1)
                for role, s in rss_snapshot(cluster).items():
                    rss_csv.write(f"{t},{role},{s['pid']},{s['rss_kib']},{s['anon_kib']}\n")
                    rss_samples.append((t, role, s["pid"], s["rss_kib"]))
                rss_csv.flush()
                m = etcd_metrics(cluster)
                d = advert_writes(cluster, seen)
                for i, n in d.items():
                    writes[i] = writes.get(i, 0) + n
                etcd_csv.write(f"{t}," + ",".join("" if m[k] is None else f"{m[k]:.0f}" for k in ETCD_METRICS)
                               + "," + ",".join(str(d.get(i, "")) for i in wids) + "\n")
                etcd_csv.flush()
                load.stop_flag.wait(args.rss_every)

        sampler = threading.Thread(target=rss_sampler, daemon=True)
        sampler.start()
        end = load.t_measure + args.duration
        next_fault = load.t_measure + args.fault_every
        while now() < end:
            if now() >= next_fault:
                faults.inject()
                next_fault += args.fault_every
                with open(os.path.join(args.outdir, "faults.jsonl"), "a") as f:
                    f.write(json.dumps(faults.events[-1]) + "\n")
                continue
            time.sleep(min(1.0, max(0.0, min(end, next_fault) - now())))
        measured_s = int(round(now() - load.t_measure))
        log("measured phase over; waiting for the clients' last requests")
        hung_threads = load.join()
        rss_end = rss_snapshot(cluster)
        cluster.etcd_adverts()
        rev_end = cluster.revision
        sampler.join(5)
        rss_csv.close()
        for i, n in advert_writes(cluster, seen).items():
            writes[i] = writes.get(i, 0) + n
        etcd_end = etcd_metrics(cluster)
        etcd_csv.close()
        migrations = cluster.metric_sum("moe_migrations_total") or 0.0
        migrating_lines, ambiguous_lines = match_migrations(cluster, load.records)
        with open(os.path.join(args.outdir, "requests.jsonl"), "w") as f:
            for r in load.records:
                f.write(json.dumps(r) + "\n")
        extra = {"migrations": migrations, "migrating_lines": migrating_lines, "t_measure_wall": t_measure_wall,
                 "measured_s": measured_s,
                 "ambiguous_lines": ambiguous_lines, "etcd_rev": (rev_start, rev_end),
                 "etcd_metrics": (etcd_start, etcd_end), "advert_writes": writes,
                 "rss_samples": rss_samples}
        body, tot = report(args, cluster, load, faults, disagreements, rss_start, rss_end, extra)
        if hung_threads:
            body += f"\n{hung_threads} client threads were still inside a request at the end (counted nowhere above).\n"
        header = open(args.header).read() if args.header else ""
        with open(args.doc, "w") as f:
            f.write(header + "\n".join(machine_md(args)) + "\n\n" + body)
        with open(os.path.join(args.outdir, "summary.json"), "w") as f:
            json.dump({"totals": tot, "faults": faults.events, "rss_start": rss_start, "rss_end": rss_end,
                       "etcd_metrics": extra["etcd_metrics"], "advert_writes": writes,
                       "migrations": migrations, "hung_threads": hung_threads}, f, indent=1)
        log(f"totals {tot}; wrote {args.doc}")
        rc = 0 if tot["lost"] == 0 and tot["corrupted"] == 0 and not hung_threads else 2
    finally:
        cluster.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
