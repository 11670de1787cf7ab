"""Helpers for the `paella serve` tests: a real server in a subprocess, and raw HTTP on loopback."""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from conftest import REPO


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """`paella serve` with ``flags`` on a free port; its temp folder (where its private cache goes) is
    ``tmp``. ``stop()`` ends it and returns its log."""

    def __init__(self, tmp, *flags):
        self.port, self.tmp = free_port(), tmp
        self.log = tmp / 'serve.log'
        env = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1', 'TMPDIR': str(tmp)}
        self.proc = subprocess.Popen([sys.executable, '-m', 'paella.cli', 'serve', '--port', str(self.port), *flags],
                                     stdout=open(self.log, 'w'), stderr=subprocess.STDOUT, env=env)
        self.url = f'http://127.0.0.1:{self.port}'
        for _ in range(240):
            try:
                if call(self.url + '/v1/health', timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                pytest.fail('server exited: ' + self.log.read_text())
        pytest.fail('server did not start: ' + self.log.read_text())

    def health(self):
        return json.loads(call(self.url + '/v1/health')[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        return self.log.read_text()


def call(url, body=None, headers=None, timeout=120, method=None):
    """(status, body bytes) of a GET (body None) or POST."""
    req = urllib.request.Request(url, data=body, headers=headers or {},
                                 method=method or ('GET' if body is None else 'POST'))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url, obj, headers=None, **kw):
    return call(url, obj if isinstance(obj, bytes) else json.dumps(obj).encode(),
                {'content-type': 'application/json', **(headers or {})}, **kw)


def raw(url, head, body=b'', timeout=30):
    """(status, body) of a request written by hand: ``head`` is the request line and headers."""
    host, port = url.split('//')[1].split(':')
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.replace('\n', '\r\n').encode() + b'\r\n\r\n' + body)
        data = b''
        while b'\r\n\r\n' not in data or len(data.split(b'\r\n\r\n', 1)[1]) < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b'\r\n\r\n', 1)
    return int(head.split()[1]), body


def multipart(fields, files):
    boundary = 'paella-test-boundary'
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b'\r\n')
    return b''.join(parts) + f'--{boundary}--\r\n'.encode(), {'content-type': f'multipart/form-data; boundary={boundary}'}


def png_bytes(size, color=(220, 30, 30), mode='RGB'):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == 'RGB' else 0).save(buf, 'PNG')
    return buf.getvalue()


def alive(url):
    status, body = call(url + '/v1/health', timeout=10)
    return status == 200 and json.loads(body)['status'] == 'ok'
