#!/usr/bin/env bash
# Ships a task's output of SIZE_MB through a real server and agent (`caravel up`) and reads
# it back; prints how long each took. The server's data directory and the agent's work
# directory are on the same disk ($TMPDIR), as with `caravel up`.
#
#   scripts/bench-logs.sh [SIZE_MB]     (default 48, under the 64 MiB per-stream limit;
#                                        needs a release build)
#
# ship: from the run's exit until the server holds all of its output, marked done (the
#       task writes it in well under a second, so most of it is shipped after the exit);
# off the node: until the agent removed the run's folder, which it does once it has seen
#       the server still hold all of it 10 s after the server acknowledged it;
# read: `caravel logs JOB > file`, served from the server's copy.
set -euo pipefail
size=${1:-48}
bin=${CARAVEL_BIN:-$(pwd)/target/release/caravel}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export HOME=$work CARAVEL_CONFIG=$work/config.toml
trap '"$bin" down --data-dir "$work/data" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$bin" up --detach --data-dir "$work/data" --listen "127.0.0.1:$port" >/dev/null
"$bin" submit --wait -- sh -c "head -c ${size}M /dev/urandom | base64 -w 76 | head -c ${size}M" >/dev/null 2>&1
job=$("$bin" jobs -o json | python3 -c 'import json,sys; print(max(j["id"] for j in json.load(sys.stdin)))')
"$bin" job show "$job" -o json > "$work/job.json"
run=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][0]["id"])' "$work/job.json")
until compgen -G "$work/data/logs/$job/$run.stdout.*.end" >/dev/null; do sleep 0.02; done
done_ms=$(date +%s%3N)
while [ -e "$work/data/agent/runs/$run" ]; do sleep 0.05; done
gone_ms=$(date +%s%3N)
t0=$(date +%s%3N)
"$bin" logs "$job" > "$work/out"
t1=$(date +%s%3N)
python3 - "$work/job.json" "$size" "$done_ms" "$((t1 - t0))" "$(stat -c %s "$work/out")" "$gone_ms" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1])); mb = int(sys.argv[2])
ended = job["runs"][0]["ended_ms"]
ship_s = (int(sys.argv[3]) - ended) / 1000
gone_s = (int(sys.argv[6]) - ended) / 1000
read_s = int(sys.argv[4]) / 1000
print(json.dumps({"bench": "logs", "size_mb": mb, "bytes_read": int(sys.argv[5]),
                  "ship_after_exit_s": round(ship_s, 2), "off_the_node_after_exit_s": round(gone_s, 2),
                  "read_s": round(read_s, 2), "read_mb_per_s": round(int(sys.argv[5]) / 2**20 / read_s, 1),
                  "state": job["state"]}))
EOF
