#!/usr/bin/env python3
"""REST invoke latency through control's HTTP frontend, for before/after comparisons.

Starts `shoal up --json` from the given binary in a fresh runtime directory, deploys the
`echo` example (one instance), then sends N sequential `POST /v1/functions/echo/invoke`
requests of SIZE bytes on one keep-alive connection and prints one JSON line with p50/p99 in
microseconds. The bearer token is taken from the token file the cluster description names,
when there is one (a build without authentication has none and is called without a header).

    perf/scripts/rest_invoke.py --shoal target/release/shoal --echo target/release/examples/echo

Absolute figures drift with the machine; compare two binaries in the same session.
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time


def percentile(sorted_us, q):
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--echo", required=True)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()

    rt = tempfile.mkdtemp(prefix="shoal-rest-bench-")
    env = dict(os.environ, SHOAL_LOG="warn")
    up = subprocess.Popen(
        [a.shoal, "up", "--json", "--control-http-addr", "127.0.0.1:0", "--socket-dir", rt],
        stdout=subprocess.PIPE, env=env, text=True)
    try:
        info = json.loads(up.stdout.readline())
        cenv = info["env"]
        env.update({k: str(v) for k, v in cenv.items()})
        token = None
        token_file = cenv.get("SHOAL_TOKEN_FILE")
        if token_file:
            with open(token_file) as f:
                token = f.read().strip()
        pkg = os.path.join(rt, "echo-pkg")
        os.makedirs(pkg)
        shutil.copy(a.echo, os.path.join(pkg, "echo"))
        subprocess.run([a.shoal, "fn", "deploy", "echo", "--path", pkg, "--min", "1", "--",
                        "./echo"], env=env, check=True, stdout=subprocess.DEVNULL)
        host, port = cenv["SHOAL_CONTROL"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port))
        headers = {"Content-Type": "application/octet-stream"}
        if token:
            headers["Authorization"] = "Bearer " + token
        body = b"x" * a.size
        deadline = time.time() + 60
        while True:  # until the instance answers
            conn.request("POST", "/v1/functions/echo/invoke", body, headers)
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                break
            if time.time() > deadline:
                raise SystemExit(f"echo never answered: HTTP {r.status}")
            time.sleep(0.1)
        lat = []
        for _ in range(a.requests):
            t = time.perf_counter()
            conn.request("POST", "/v1/functions/echo/invoke", body, headers)
            r = conn.getresponse()
            out = r.read()
            lat.append((time.perf_counter() - t) * 1e6)
            assert r.status == 200 and out == body, r.status
        lat.sort()
        print(json.dumps({
            "bench": "rest_invoke", "size": a.size, "requests": a.requests,
            "token": token is not None, "p50_us": round(percentile(lat, 0.5), 1),
            "p99_us": round(percentile(lat, 0.99), 1),
        }))
    finally:
        up.terminate()
        up.wait(timeout=30)
        shutil.rmtree(rt, ignore_errors=True)


if __name__ == "__main__":
    main()
