#!/usr/bin/env bash
# Saves a checkpoint of SIZE_MB through a real server and agent (`caravel up`) and restores
# it for a retry; prints how long each took. The server's data directory and the agent's
# work directory are on the same disk ($TMPDIR), as with `caravel up`.
#
#   scripts/bench-checkpoint.sh [SIZE_MB]     (default 1024; needs a release build)
#
# save:    from the first attempt's exit to the checkpoint being kept by the server
#          (pack, upload, SHA-256, archive check, fsync, rename);
# restore: from then to the retry's process start (exit report, scheduling, download,
#          SHA-256, unpack).
set -euo pipefail
size=${1:-1024}
bin=${CARAVEL_BIN:-$(pwd)/target/release/caravel}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export HOME=$work CARAVEL_CONFIG=$work/config.toml
trap '"$bin" down --data-dir "$work/data" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$bin" up --detach --data-dir "$work/data" --listen "127.0.0.1:$port" >/dev/null
script='d="$CARAVEL_CHECKPOINT_DIR"
if [ -f "$d/big" ]; then echo "restored $(stat -c %s "$d/big") bytes"; exit 0; fi
head -c '"$size"'M /dev/urandom > "$d/.big"; mv "$d/.big" "$d/big"; exit 1'
"$bin" submit --wait --max-retries 1 --memory 256Mi -- sh -c "$script" >/dev/null
job=$("$bin" jobs -o json | python3 -c 'import json,sys; print(max(j["id"] for j in json.load(sys.stdin)))')
"$bin" job show "$job" -o json > "$work/job.json"
"$bin" checkpoint ls "$job" -o json > "$work/ckpt.json"
python3 - "$work/job.json" "$work/ckpt.json" "$size" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1])); ck = json.load(open(sys.argv[2]))[0]
runs = sorted(job["runs"], key=lambda r: r["attempt"])
first_end, second_start = runs[0]["ended_ms"], runs[1]["started_ms"]
save_s = (ck["saved_ms"] - first_end) / 1000
restore_s = (second_start - ck["saved_ms"]) / 1000
mb = int(sys.argv[3])
print(json.dumps({"bench": "checkpoint", "size_mb": mb, "archive_bytes": ck["bytes"],
                  "save_s": round(save_s, 2), "save_mb_per_s": round(mb / save_s, 1),
                  "restore_s": round(restore_s, 2), "restore_mb_per_s": round(mb / restore_s, 1),
                  "state": job["state"]}))
EOF
