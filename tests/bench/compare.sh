#!/usr/bin/env bash
# Touchpoint's benchmark and the BullMQ harness (tests/bench/bullmq, BullMQ 6.7) back to
# back on one throwaway redis-server, then the ratios. Figures drift on shared machines;
# the ratios, measured in one invocation, are what docs/performance.md reports.
#
#   tests/bench/compare.sh            # chain 20,000 x 4, burst 50,000, enroll 100,000
#   CONTACTS=5000 tests/bench/compare.sh   # smaller, for a quick look
#
# Needs redis-server, node and npm (npm installs BullMQ as the lock file pins it).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT=${REDIS_PORT:-6390}
CONTACTS=${CONTACTS:-20000}
BURST=${BURST:-50000}
ENROLL=${ENROLL:-100000}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"

redis-server --port "$PORT" --save '' --appendonly no --daemonize yes \
  --pidfile "$PWD/$OUT/redis.pid" --logfile "$PWD/$OUT/redis.log"
trap 'kill "$(cat "$OUT/redis.pid")" 2>/dev/null || true' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

cargo build --release -p touchpoint-tests --bin touchpoint-bench
BENCH=target/release/touchpoint-bench
URL="redis://127.0.0.1:$PORT"

(cd tests/bench/bullmq && [ -d node_modules ] || npm install --no-audit --no-fund --silent)

echo "== BullMQ"
(cd tests/bench/bullmq && REDIS_PORT=$PORT node chain.js "$CONTACTS" 4 50) | tee "$OUT/bullmq-chain.json"
(cd tests/bench/bullmq && REDIS_PORT=$PORT node delayed.js "$BURST" 200 12000 0) | tee "$OUT/bullmq-burst.json"
(cd tests/bench/bullmq && REDIS_PORT=$PORT node enqueue.js bulk "$ENROLL" 1000) | tee "$OUT/bullmq-enqueue.json"
echo "== Touchpoint"
$BENCH chain --redis-url "$URL" --contacts "$CONTACTS" --steps 4 --json | tee "$OUT/tp-chain.json"
$BENCH burst --redis-url "$URL" --contacts "$BURST" --json | tee "$OUT/tp-burst.json"
$BENCH burst --redis-url "$URL" --contacts "$BURST" --hand-out-ahead 0s --json | tee "$OUT/tp-burst-no-ahead.json"
$BENCH enroll --redis-url "$URL" --contacts "$ENROLL" --json | tee "$OUT/tp-enroll.json"
$BENCH idle --redis-url "$URL" --contacts "$ENROLL" --json | tee "$OUT/tp-idle.json"

echo "== Ratios (Touchpoint / BullMQ, same Redis, same invocation)"
python3 - "$OUT" <<'PY'
import json, sys, os
d = sys.argv[1]
def load(name):
    with open(os.path.join(d, name)) as f:
        return json.loads(f.read().strip().splitlines()[-1])
bc, bb, be = load("bullmq-chain.json"), load("bullmq-burst.json"), load("bullmq-enqueue.json")
tc, tb, te, ti = load("tp-chain.json"), load("tp-burst.json"), load("tp-enroll.json"), load("tp-idle.json")
tn = load("tp-burst-no-ahead.json")
def g(o, *keys):
    for k in keys:
        if k in o:
            return o[k]
    return float("nan")
rows = [
    ("chain steps/s", tc["steps_per_s"], g(bc, "steps_per_s"), "x (target >= 5)"),
    ("chain Redis CPU us/step", tc["redis_cpu_us_per_step"], g(bc, "redis_cpu_us_per_job"), "x (target <= 0.2)"),
    ("chain Redis cmds/step", tc["redis_cmds_per_step"], g(bc, "redis_cmds_per_job"), "x (target: <= 6 absolute)"),
    ("burst lag p99 ms", tb["lag_ms_p99"], bb["lag_ms"]["p99"], "x (target: < 1000 ms absolute)"),
    ("burst lag p99 ms, not ahead", tn["lag_ms_p99"], bb["lag_ms"]["p99"], "x (--hand-out-ahead 0s)"),
    ("enroll runs/s", te["runs_per_s"], be["jobs_per_s"], "x (target: >= 50,000 absolute)"),
]
for name, ours, theirs, note in rows:
    ratio = ours / theirs if theirs and theirs == theirs else float("nan")
    print(f"{name:28} touchpoint {ours:>12,.1f}   bullmq {theirs:>12,.1f}   ratio {ratio:6.2f} {note}")
print(f"{'idle Redis bytes/run':28} touchpoint {ti['redis_bytes_per_run']:>12,.1f}   (with its new contact)")
known = ti.get("redis_bytes_per_run_of_a_known_contact") or float("nan")
print(f"{'idle Redis bytes/run, known':28} touchpoint {known:>12,.1f}   (contact already stored; target <= 400)")
PY
