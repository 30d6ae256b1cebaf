"""A sample web process: answers every request with the dyno's name."""

import http.server
import os


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {os.environ.get('DYNO', 'a dyno')}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


port = int(os.environ.get("PORT", "5000"))
http.server.HTTPServer(("127.0.0.1", port), Hello).serve_forever()
