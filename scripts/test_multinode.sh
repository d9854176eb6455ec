#!/usr/bin/env bash
# `make test-multinode`: the app on a two-node Ray cluster started on this machine, deployed the way Ray
# users deploy it (`ray start --head`, `ray start --address`, `serve deploy`). Checks that the 8 emulated
# expert workers are spread over both nodes (worker_scheduling: spread), that chat requests succeed over
# HTTP, and that the engine reaches the workers of the other node over TCP (and its own node's over Unix
# sockets). Took 2.5 to 7.5 minutes on a shared 2-core machine (gives up after 10).
#
# It leaves nothing running, even on failure or Ctrl-C: each `ray start` runs in a session of its own
# (setsid) and the teardown signals exactly the processes of those sessions, by PID. It never runs
# `ray stop`, which would stop every Ray cluster on the machine. Every port is picked free at start;
# the nodes' temp dirs (and the workers' socket folders, through TMPDIR) live in one folder, deleted on
# success and kept, with its logs, on failure.
#
#   bash scripts/test_multinode.sh
#   VIBE_MULTINODE_MODEL=/path/to/checkpoint bash scripts/test_multinode.sh    # another model folder
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
MODEL=${VIBE_MULTINODE_MODEL:-$REPO/deploy/models/vibe-tiny-moe}
PROMPTS=${VIBE_MULTINODE_PROMPTS:-$REPO/deploy/prompts/profile.jsonl}
TIMEOUT_S=${VIBE_MULTINODE_TIMEOUT_S:-600}  # the whole run, teardown excluded
TOKEN=multinode-admin-token-$RANDOM$RANDOM
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
unset RAY_ADDRESS  # never talk to another cluster

say() { echo "[multinode $(date +%H:%M:%S)] $*"; }
die() { say "FAIL: $*" >&2; exit 1; }
left() { echo $((DEADLINE - SECONDS)); }

[ -x "$PY" ] || die "no virtualenv at $VENV (run 'make install')"
[ -f "$MODEL/config.json" ] && [ -f "$MODEL/tokenizer_config.json" ] \
  || die "no model with a tokenizer at $MODEL: run 'make model' or set VIBE_MULTINODE_MODEL"
MODEL=$(cd "$MODEL" && pwd -P)
PROMPTS_ARG=null
if [ -f "$PROMPTS" ]; then PROMPTS_ARG=$PROMPTS; else say "no $PROMPTS: the app starts without a profiling pass"; fi
DEADLINE=$((SECONDS + TIMEOUT_S))

WORK=$(mktemp -d /tmp/vibe-mn-XXXXXX)  # short: Ray's Unix socket paths must stay under 108 bytes
mkdir "$WORK/tmp"
OWN_SID=$(ps -o sid= -p $$ | tr -d ' ')

# The processes of the sessions named in $WORK/*.sid, by PID (empty once they are all gone). A session
# id is used only if it is a number and not this script's own session.
our_pids() {
  local sids="" sidfile sid
  for sidfile in "$WORK"/*.sid; do
    [ -f "$sidfile" ] || continue
    sid=$(cat "$sidfile")
    [[ $sid =~ ^[0-9]+$ ]] && [ "$sid" -gt 1 ] && [ "$sid" != "$OWN_SID" ] && sids="$sids $sid"
  done
  [ -n "$sids" ] && ps -eo pid=,sid= | awk -v sids="$sids" 'BEGIN {split(sids, s, " "); for (i in s) keep[s[i]] = 1}
                                                            $2 in keep {print $1}'
  return 0
}

# Signal every process of our sessions (TERM, then KILL); true once none is left.
stop_cluster() {
  local signal i
  for signal in TERM KILL; do
    [ -z "$(our_pids)" ] && return 0
    kill -"$signal" $(our_pids) 2>/dev/null || true
    for i in $(seq 1 32); do [ -z "$(our_pids)" ] && return 0; sleep 0.25; done
  done
  say "processes still running: $(our_pids | tr '\n' ' ')"
  return 1
}

cleanup() {
  local rc=$? clean=0
  trap - EXIT INT TERM
  say "tearing the cluster down"
  stop_cluster || clean=1
  if [ $rc -eq 0 ] && [ $clean -eq 0 ]; then
    rm -rf "$WORK"
    say "PASS"
  else
    for log in "$WORK"/*.log; do [ -f "$log" ] && { echo "--- $log"; tail -n 15 "$log"; }; done
    grep -rhs -B2 -A12 "Traceback" "$WORK"/head/session_latest/logs/serve "$WORK"/*/session_latest/logs/worker-*.err \
      2>/dev/null | tail -n 60 || true
    say "logs kept in $WORK"
    [ $rc -eq 0 ] && rc=1
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_A AGENT_B HTTP_PORT <<< "$("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"

# start_node NAME ARGS...: `ray start` in a new session whose id goes to $WORK/NAME.sid.
start_node() {
  local name=$1; shift
  TMPDIR=$WORK/tmp timeout 120 setsid bash -c 'echo $$ > "$0"; exec "$@"' "$WORK/$name.sid" \
    "$VENV/bin/ray" start --node-ip-address 127.0.0.1 --temp-dir "$WORK/$name" --num-cpus 2 --num-gpus 0 \
    --object-store-memory 200000000 --disable-usage-stats "$@" > "$WORK/$name.log" 2>&1 \
    || die "ray start of node $name failed (see $WORK/$name.log)"
}

say "starting the head node (node_a) on port $GCS_PORT"
start_node head --head --port "$GCS_PORT" --include-dashboard true --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASH_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --dashboard-agent-listen-port "$AGENT_A" --resources '{"node_a": 100}'
say "starting the second node (node_b)"
start_node worker --address "127.0.0.1:$GCS_PORT" --dashboard-agent-listen-port "$AGENT_B" \
  --resources '{"node_b": 100}'

cat > "$WORK/serve.yaml" <<EOF
# Both nodes share this machine's address, so only the head runs an HTTP proxy.
proxy_location: HeadOnly
http_options:
  host: 127.0.0.1
  port: $HTTP_PORT
applications:
  - name: vibe
    route_prefix: /
    import_path: deploy.app:build_app
    args:
      model: $MODEL
      model_roots: [$(dirname "$MODEL")]
      profile_prompts: $PROMPTS_ARG
      num_devices: 8
      worker_scheduling: spread
      admin_token: $TOKEN
      max_num_seqs: 8
EOF
say "serve deploy (http port $HTTP_PORT)"
timeout 120 "$VENV/bin/serve" deploy -a "http://127.0.0.1:$DASH_PORT" "$WORK/serve.yaml" > "$WORK/deploy.log" 2>&1 \
  || die "serve deploy failed (see $WORK/deploy.log)"

say "waiting for the app, then checking it ($(left) s left)"
timeout "$(left)" "$PY" - "$GCS_PORT" "$DASH_PORT" "$HTTP_PORT" "$TOKEN" <<'EOF' || die "checks failed"
"""Wait for the app; check the workers' nodes, chat over HTTP, and which transport the engine uses."""
import concurrent.futures
import os
import sys
import time

import httpx
import ray
from ray.util.state import list_actors, list_nodes

gcs, dash, http, token = sys.argv[1:5]
dashboard, base = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{http}"


def app_status() -> tuple[str, str]:
    app = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()["applications"].get("vibe", {})
    return app.get("status", "NOT_STARTED"), app.get("message", "")


started = time.monotonic()
status, message = app_status()
while status not in ("RUNNING", "DEPLOY_FAILED"):
    time.sleep(2)
    status, message = app_status()
if status != "RUNNING":
    sys.exit(f"the app did not start: {status}: {message}")
print(f"app RUNNING after {time.monotonic() - started:.0f} s")

nodes = {n.node_id: ("node_a" if "node_a" in n.resources_total else "node_b") for n in list_nodes(address=dashboard)}
actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
workers = {a.name: a for a in actors if a.class_name == "ExpertWorkerActor"}
(ingress,) = [a for a in actors if a.class_name.endswith("OpenAIIngress")]
by_node: dict[str, list[str]] = {}
for name, actor in sorted(workers.items()):
    by_node.setdefault(nodes[actor.node_id], []).append(name.rsplit("-", 1)[1])
print(f"workers by node: {by_node}; ingress on {nodes[ingress.node_id]}")
if len(workers) != 8 or set(by_node) != {"node_a", "node_b"}:
    sys.exit(f"expected 8 workers on both nodes, got {by_node}")


def chat(i: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model_name, "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
        "max_tokens": 16})


model_name = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
chat_started = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(chat, range(8)))
for answer in answers:
    if answer.status_code != 200 or answer.json()["usage"]["completion_tokens"] < 1:
        sys.exit(f"chat request failed: {answer.status_code} {answer.text[:300]}")
print(f"8 chat requests (4 at a time) answered in {time.monotonic() - chat_started:.1f} s")
stats = httpx.get(f"{base}/admin/stats", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
print(f"placement version {stats['placement_version']}, lost devices {stats['lost_devices']}")


def tcp_sockets(pid: int) -> list[tuple[int, str]]:
    """(local port, state hex) of every TCP socket the process holds, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            rows += [line.split() for line in f]
    return [(int(r[1].rsplit(":", 1)[1], 16), r[3]) for r in rows if r[9] in inodes]


ray.init(address=f"127.0.0.1:{gcs}", namespace="vibe", log_to_driver=False, logging_level="ERROR")
infos = ray.get([ray.get_actor(name).info.remote() for name in sorted(workers)], timeout=60)
ray.shutdown()
for name, info in zip(sorted(workers), infos):
    port = int(info.tcp_address.rsplit(":", 1)[1])
    established = sum(1 for p, state in tcp_sockets(workers[name].pid) if p == port and state == "01")
    remote = workers[name].node_id != ingress.node_id
    print(f"worker {info.index} on {nodes[workers[name].node_id]}: {established} TCP connection(s) from engines")
    if remote and established < 1:
        sys.exit(f"worker {info.index} is on another node than the ingress but has no TCP connection")
    if not remote and established:
        sys.exit(f"worker {info.index} shares the ingress's node but is reached over TCP, not its Unix socket")
EOF
say "checks passed in $((SECONDS)) s"
