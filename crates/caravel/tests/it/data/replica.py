"""A service replica for the end-to-end tests: stdlib only, listens on $PORT.

GET /healthz        200 once started
GET /work?ms=N      sleeps N ms, answers {"job": ..., "version": ...}
GET /stream?n=K&ms=M  K server-sent events, M ms apart, chunked
POST /echo          the request body back
GET /crash          the process exits at once (a replica crash)
GET /close          stops listening but stays alive (connections are refused)
GET /livez          200 for $LIVE_FOR_S seconds after start (default: forever), then 500
"""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

JOB = os.environ.get("CARAVEL_JOB_ID", "?")
VERSION = os.environ.get("VERSION", "1")
DELAY = float(os.environ.get("START_DELAY_S", "0"))
LIVE_FOR = float(os.environ.get("LIVE_FOR_S", "1e12"))
STARTED = time.time()
time.sleep(DELAY)


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle plus delayed ACKs
    # stall every keep-alive response by 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/healthz":
            return self.send(200, b"ok", "text/plain")
        if u.path == "/work":
            time.sleep(int(q.get("ms", "0")) / 1000)
            return self.send(200, json.dumps({"job": JOB, "version": VERSION}).encode())
        if u.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "5"))):
                data = f"data: {i} {JOB}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(int(q.get("ms", "100")) / 1000)
            self.wfile.write(b"0\r\n\r\n")
            return
        if u.path == "/livez":
            alive = time.time() - STARTED < LIVE_FOR
            return self.send(200 if alive else 500, b"alive" if alive else b"wedged", "text/plain")
        if u.path == "/close":
            # This connection closes too, so no pooled connection to us survives.
            self.close_connection = True
            self.send_response(200)
            self.send_header("connection", "close")
            self.send_header("content-length", "7")
            self.end_headers()
            self.wfile.write(b"closing")
            import socket as _s
            try:
                # shutdown first: a plain close can leave the socket listening while the
                # serving thread still polls it.
                self.server.socket.shutdown(_s.SHUT_RDWR)
            except OSError:
                pass
            self.server.socket.close()
            return
        if u.path == "/crash":
            os._exit(3)
        self.send(404, b'{"error":"no such path"}')

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        self.send(200, body, self.headers.get("content-type", "application/octet-stream"))

    do_PUT = do_POST


ThreadingHTTPServer.daemon_threads = True
try:
    ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
except (OSError, ValueError):
    # /close: the listening socket is gone; stay alive so only the port refuses.
    time.sleep(1e9)
