"""Load for tinylm through the Caravel gateway (stdlib only).

    python3 examples/tinylm/load.py --concurrency 16 --duration 30
    python3 examples/tinylm/load.py --url http://127.0.0.1:7080/s/default/tinylm --stream

The server URL and token come from --url/--token, else CARAVEL_SERVER / CARAVEL_TOKEN,
else the config `caravel up` wrote. Prints requests, errors by status, throughput and
latency percentiles.
"""
import argparse, collections, json, os, threading, time, urllib.error, urllib.request


def config():
    p = os.environ.get("CARAVEL_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME", os.path.expanduser("~/.config")), "caravel", "config.toml")
    out = {}
    try:
        for line in open(p):
            if "=" in line:
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip().strip('"')
    except OSError:
        pass
    return out


def main():
    cfg = config()
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="the service's gateway URL")
    ap.add_argument("--token", default=os.environ.get("CARAVEL_TOKEN") or cfg.get("token"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true")
    a = ap.parse_args()
    server = os.environ.get("CARAVEL_SERVER") or cfg.get("server") or "http://127.0.0.1:7080"
    url = (a.url or f"{server}/s/default/tinylm") + "/generate"
    lat, codes, lock = [], collections.Counter(), threading.Lock()
    stop = time.time() + a.duration

    def worker(i):
        n = 0
        while time.time() < stop:
            body = json.dumps({"prompt": "the pool", "max_tokens": a.max_tokens, "seed": i * 100000 + n,
                               "stream": a.stream}).encode()
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            if a.token:
                req.add_header("authorization", f"Bearer {a.token}")
            t0 = time.time()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except OSError as e:
                code = f"conn:{type(e).__name__}"
            with lock:
                lat.append(time.time() - t0)
                codes[code] += 1
            n += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(a.concurrency)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
    ok = codes.get(200, 0)
    print(json.dumps({"requests": len(lat), "ok": ok, "errors": {str(k): v for k, v in codes.items() if k != 200},
                      "rps": round(len(lat) / wall, 1), "p50_ms": round(pct(0.5), 1),
                      "p99_ms": round(pct(0.99), 1), "max_ms": round(lat[-1] * 1000, 1) if lat else None}))


if __name__ == "__main__":
    main()
