"""Load on `paella serve` over loopback: stages of N clients against /v1/generate, then a memory soak.

Each client sends one request after another on one keep-alive connection; a 503 is honoured as a client
should (it waits the Retry-After the server sends, 1 s, on the same connection). Per stage: images served per second ("good
throughput"), latency of the 200s, latency of the 503s, and the server's peak memory. The soak runs
``--soak-clients`` clients for ``--soak`` seconds and samples the server's memory.

    python benchmarks/serve_load.py --stages 1 5 20 80 --seconds 30 --soak 180 > docs/serve_load.jsonl
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def health(port):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    conn.request('GET', '/v1/health')
    return json.loads(conn.getresponse().read())


def client(port, stop, results, seed):
    conn, body = None, None
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
        body = json.dumps({'prompt': 'red apple', 'seed': seed})
        seed += 1000
        t0 = time.perf_counter()
        try:
            conn.request('POST', '/v1/generate', body, {'content-type': 'application/json'})
            r = conn.getresponse()
            r.read()
        except OSError:
            conn = None
            continue
        results.append((time.perf_counter(), r.status, time.perf_counter() - t0))
        if r.status == 503:                               # kept alive: a refusal does not close the connection
            stop.wait(float(r.getheader('retry-after') or 1))


def pct(xs, q):
    """The q-quantile of sorted seconds, in ms."""
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None


def stage(port, clients, seconds, sample_every=1.0):
    stop, results, threads = threading.Event(), [], []
    for i in range(clients):
        threads.append(threading.Thread(target=client, args=(port, stop, results, i), daemon=True))
        threads[-1].start()
    start, rss = time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        time.sleep(sample_every)
        rss.append(health(port)['rss_mb'])
    stop.set()
    end = time.perf_counter()
    for t in threads:
        t.join(timeout=120)
    inside = [(s, dt) for t, s, dt in results if start + min(5.0, seconds / 4) <= t <= end]   # after warm-up
    span = end - start - min(5.0, seconds / 4)
    ok = sorted(dt for s, dt in inside if s == 200)
    busy = sorted(dt for s, dt in inside if s == 503)
    return {'clients': clients, 'seconds': round(span, 1), 'served': len(ok), 'refused': len(busy),
            'other': len(inside) - len(ok) - len(busy), 'images_per_s': round(len(ok) / span, 2),
            'ok_p50_ms': pct(ok, 0.5), 'ok_p95_ms': pct(ok, 0.95), 'refused_p50_ms': pct(busy, 0.5),
            'refused_p95_ms': pct(busy, 0.95), 'rss_mb_max': round(max(rss), 1), 'rss': rss}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--stages', type=int, nargs='+', default=[1, 5, 20, 80])
    p.add_argument('--seconds', type=float, default=30)
    p.add_argument('--soak', type=float, default=180, help='seconds of the memory soak (0: none)')
    p.add_argument('--soak-clients', type=int, default=4)
    p.add_argument('--flags', nargs=argparse.REMAINDER, default=[], help='more `paella serve` flags')
    args = p.parse_args()
    port = free_port()
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1'}
    server = subprocess.Popen([sys.executable, '-m', 'paella.cli', 'serve', '--port', str(port), *args.flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(240):
            try:
                health(port)
                break
            except OSError:
                time.sleep(0.5)
        rows = []
        for n in args.stages:
            row = stage(port, n, args.seconds)
            row.pop('rss')
            rows.append(row)
            print(json.dumps(row), flush=True)
        best = max(r['images_per_s'] for r in rows)
        print(json.dumps({'summary': 'stages', 'best_images_per_s': best,
                          'last_vs_best': round(rows[-1]['images_per_s'] / best, 3),
                          'refused_p95_ms_max': max((r['refused_p95_ms'] or 0) for r in rows)}), flush=True)
        if args.soak:
            row = stage(port, args.soak_clients, args.soak, sample_every=5.0)
            rss = row.pop('rss')
            half = rss[len(rss) // 2:]
            print(json.dumps({'summary': 'soak', **row, 'rss_mb_first': rss[0], 'rss_mb_last': rss[-1],
                              'rss_mb_min': min(rss), 'rss_mb_second_half_range': round(max(half) - min(half), 1),
                              'rss_mb_median': statistics.median(rss)}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == '__main__':
    main()
