#!/usr/bin/env python3
"""Loopback router for the offline state-machine test.

moto's Step Functions engine sends every AWS call (S3 ItemReader, Lambda Invoke) to
http://localhost:$MOTO_PORT. This router listens there: Lambda Invoke calls go to
`cargo lambda watch` (which knows functions by binary name), everything else to moto.
watch answers a handler error with HTTP 500 + {"errorType", "errorMessage"}; real Lambda answers
200 with X-Amz-Function-Error, which is what Step Functions' Retry and Catch act on, so the
router translates.

usage: lambda_router.py --port P --moto-port M --lambda-port L
"""

import argparse
import http.client
import re
import sys
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INVOKE = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")
HOP = {"host", "content-length", "connection", "transfer-encoding"}


def function_name(segment):
    name = urllib.parse.unquote(segment)
    if ":function:" in name:
        name = name.split(":function:", 1)[1]
    return name.split(":", 1)[0]


class Router(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    moto_port = 0
    lambda_port = 0

    def log_message(self, *args):
        pass

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        m = INVOKE.match(parsed.path)
        if m:
            port = self.lambda_port
            path = "/2015-03-31/functions/%s/invocations" % function_name(m.group(1))
        else:
            port = self.moto_port
            path = self.path
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
        except OSError as e:
            status, data, out = 502, ("router: upstream :%d: %s" % (port, e)).encode(), []
        finally:
            conn.close()
        if m and status >= 500 and b"errorType" in data:
            status = 200
            out.append(("X-Amz-Function-Error", "Unhandled"))
            out.append(("X-Amzn-RequestId", str(uuid.uuid4())))
        self.send_response(status)
        for k, v in out:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = relay


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--moto-port", type=int, required=True)
    p.add_argument("--lambda-port", type=int, required=True)
    a = p.parse_args()
    Router.moto_port, Router.lambda_port = a.moto_port, a.lambda_port
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Router)
    server.daemon_threads = True
    print("router on 127.0.0.1:%d" % a.port, file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
