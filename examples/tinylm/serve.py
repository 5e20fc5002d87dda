"""tinylm's inference server: a Caravel service replica (stdlib only).

Listens on $PORT. Endpoints:
  GET  /healthz                  200 once the model is loaded (the readiness probe)
  POST /generate                 {"prompt": "the scheduler", "max_tokens": 32,
                                  "temperature": 0.8, "seed": 1, "stream": false}
                                 -> {"text": ..., "tokens": n}; with "stream": true,
                                 server-sent events, one per token, then "data: [DONE]"
  GET  /generate?prompt=...&max_tokens=...   the same, for curl

Generation samples each next word from the trigram counts of model.json, interpolated
with the bigram and unigram counts (weights 0.6 / 0.3 / 0.1) at the given temperature:
real per-token model work on the CPU.
"""
import json, math, os, random, re, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

HERE = os.path.dirname(os.path.abspath(__file__))
T0 = time.time()
M = json.load(open(os.path.join(HERE, "model.json")))
VOCAB = M["vocab"]
INDEX = {w: i for i, w in enumerate(VOCAB)}
UNI = M["unigram"]
UNI_TOTAL = float(sum(UNI))
BI = {int(k): {int(c): n for c, n in v.items()} for k, v in M["bigram"].items()}
TRI = {k: {int(c): n for c, n in v.items()} for k, v in M["trigram"].items()}
TOP_UNI = sorted(range(len(UNI)), key=lambda i: -UNI[i])[:200]
LOADED_MS = (time.time() - T0) * 1000
WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'-]*|[0-9]+(?:\.[0-9]+)?|[.,;:!?()%]")
MAX_TOKENS = 512


def next_word(a, b, temperature, rng):
    tri = TRI.get(f"{a} {b}", {})
    bi = BI.get(b, {})
    tri_n = float(sum(tri.values())) or 1.0
    bi_n = float(sum(bi.values())) or 1.0
    cands = set(tri) | set(bi) | set(TOP_UNI)
    cands.discard(len(VOCAB))
    weights = []
    for c in cands:
        p = 0.6 * tri.get(c, 0) / tri_n + 0.3 * bi.get(c, 0) / bi_n + 0.1 * UNI[c] / UNI_TOTAL
        weights.append((c, math.exp(math.log(p) / max(temperature, 0.05))))
    total = sum(w for _, w in weights)
    x = rng.random() * total
    for c, w in weights:
        x -= w
        if x <= 0:
            return c
    return weights[-1][0]


def generate(prompt, max_tokens, temperature, seed):
    ids = [INDEX.get(t.lower(), len(VOCAB)) for t in WORD.findall(prompt)]
    a, b = ([len(VOCAB), len(VOCAB)] + ids)[-2:]
    rng = random.Random(seed)
    for _ in range(max_tokens):
        c = next_word(a, b, temperature, rng)
        yield VOCAB[c]
        a, b = b, c


def detok(words):
    out = ""
    for w in words:
        out += w if w in ".,;:!?)%" or not out else " " + w
    return out


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle plus delayed ACKs
    # stall every keep-alive response by 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def params(self, req):
        try:
            prompt = str(req.get("prompt", ""))
            n = int(req.get("max_tokens", 32))
            t = float(req.get("temperature", 0.8))
            seed = req.get("seed")
            stream = req.get("stream") in (True, "true", "1")
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad parameter: {e}")
        if not 1 <= n <= MAX_TOKENS:
            raise ValueError(f"max_tokens: must be 1 to {MAX_TOKENS}")
        if not 0 < t <= 5:
            raise ValueError("temperature: must be above 0 and at most 5")
        return prompt, n, t, seed, stream

    def run(self, req):
        try:
            prompt, n, t, seed, stream = self.params(req)
        except ValueError as e:
            return self.reply(400, {"error": str(e)})
        if not stream:
            words = list(generate(prompt, n, t, seed))
            return self.reply(200, {"text": detok(words), "tokens": len(words)})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(b):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
            self.wfile.flush()

        for w in generate(prompt, n, t, seed):
            chunk(b"data: " + json.dumps({"token": w}).encode() + b"\n\n")
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        u = urlparse(self.path)
        if u.path == "/healthz":
            return self.reply(200, {"ok": True, "words": len(VOCAB), "load_ms": round(LOADED_MS, 1)})
        if u.path == "/generate":
            return self.run({k: v[0] for k, v in parse_qs(u.query).items()})
        self.reply(404, {"error": f"no route {u.path}"})

    def do_POST(self):
        u = urlparse(self.path)
        if u.path != "/generate":
            return self.reply(404, {"error": f"no route {u.path}"})
        n = int(self.headers.get("content-length", "0"))
        try:
            req = json.loads(self.rfile.read(n) or b"{}")
            if not isinstance(req, dict):
                raise ValueError("expected a JSON object")
        except ValueError as e:
            return self.reply(400, {"error": f"body: {e}"})
        self.run(req)


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 128
    port = int(os.environ.get("PORT", "8080"))
    print(f"tinylm: {len(VOCAB)} words loaded in {LOADED_MS:.0f} ms, listening on {port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
