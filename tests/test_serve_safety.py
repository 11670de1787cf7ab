"""`paella serve` against an attacker: files, hosts and origins, decompression bombs, malformed input,
clients that leave, floods, slow clients, bad flags, the cache folder. Each test failed on the server
before these defences (main at bf14b4e)."""
import concurrent.futures
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from serving import Server, alive, call, multipart, png_bytes, post_json, raw


@pytest.fixture(scope='module')
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp('safety'), '--queue', '60', '--request-timeout', '2')
    yield server
    server.stop()


def gradio_call(url, api_name, data):
    """The events a Gradio API call streams back, as a list of (event, data) pairs."""
    status, body = post_json(f'{url}/gradio_api/call/{api_name}', {'data': data})
    assert status == 200, body
    event_id = json.loads(body)['event_id']
    text = call(f'{url}/gradio_api/call/{api_name}/{event_id}')[1].decode()
    return [(block.split('\n')[0], block) for block in text.strip().split('\n\n')]


def test_a_local_file_named_in_a_request_is_neither_copied_nor_served(srv, tmp_path):
    secret = tmp_path / 'secret-emoji.png'
    secret.write_bytes(png_bytes((64, 64)))
    settings = ['', 0, 4, 1.5, 1.5, 'random']
    for api_name, data in [('edit', [{'path': str(secret), 'meta': {'_type': 'gradio.FileData'}}, 'x', 0.5, *settings]),
                           ('outpaint', [{'path': '/etc/hostname', 'meta': {'_type': 'gradio.FileData'}}, 'x', 512,
                                         256, 'center', *settings])]:
        events = gradio_call(srv.url, api_name, data)
        assert events[-1][0] == 'event: error', events
        assert 'secret' not in events[-1][1] and 'hostname' not in events[-1][1]
    copies = [p for p in srv.tmp.rglob('*') if p.name in ('secret-emoji.png', 'hostname')]
    assert copies == []
    for path in (secret, '/etc/hostname'):
        assert call(f'{srv.url}/gradio_api/file={path}')[0] == 403


def test_foreign_hosts_and_origins_are_refused(srv):
    gen = srv.url + '/v1/generate'
    assert call(srv.url + '/', headers={'Host': 'attacker.example'})[0] == 400
    assert call(srv.url + '/v1/health', headers={'Host': 'attacker.example:7860'})[0] == 400
    assert post_json(gen, {'prompt': 'x'}, {'Host': 'rebound.example'})[0] == 400
    for origin in ('http://evil.example', 'null', f'http://127.0.0.1:{srv.port + 1}'):
        status, body = post_json(gen, {'prompt': 'x', 'steps': 1}, {'Origin': origin})
        assert status == 403 and 'other sites' in json.loads(body)['error']
    body, headers = multipart({'prompt': 'x'}, {'image': ('a.png', png_bytes((64, 64)))})
    assert call(srv.url + '/v1/edit', body, {**headers, 'Origin': 'http://evil.example'})[0] == 403
    # the page's own origin and plain programs (no Origin) are served
    assert post_json(gen, {'prompt': 'x', 'steps': 1}, {'Origin': srv.url})[0] == 200
    assert call(srv.url + '/', headers={'Host': 'localhost'})[0] == 200
    # JSON endpoints want JSON: a form or text/plain (what a page may send without asking) is 415
    assert call(gen, b'{"prompt": "x"}', {'content-type': 'text/plain'})[0] == 415
    assert call(srv.url + '/v1/edit', b'prompt=x', {'content-type': 'application/x-www-form-urlencoded'})[0] == 415


def test_decompression_bombs_are_refused_from_the_header(srv):
    bomb = png_bytes((12000, 12000), mode='L')
    assert len(bomb) < 200_000
    body, headers = multipart({'prompt': 'x'}, {'image': ('bomb.png', bomb)})
    before = srv.health()['rss_mb']
    t0 = time.perf_counter()
    status, out = call(srv.url + '/v1/edit', body, headers)
    elapsed = time.perf_counter() - t0
    one = srv.health()['rss_mb']
    assert status == 400 and 'limit of 512 pixels' in json.loads(out)['error']
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: call(srv.url + '/v1/edit', body, headers)[0], range(10)))
    ten = srv.health()['rss_mb']
    print(f"bomb refused in {elapsed * 1000:.0f} ms; RSS {before:.0f} -> {one:.0f} (one) -> {ten:.0f} MiB (ten at once)")
    assert elapsed < 0.2 and one - before < 50 and ten - before < 200 and statuses == [400] * 10
    # just over the limit: refused with the size, still without decoding
    body, headers = multipart({'prompt': 'x'}, {'image': ('big.png', png_bytes((600, 40)))})
    status, out = call(srv.url + '/v1/edit', body, headers)
    assert status == 400 and '600x40' in json.loads(out)['error']


def test_malformed_values_are_400_and_keep_the_connection(srv):
    gen = srv.url + '/v1/generate'
    start = len(srv.log.read_text())
    cases = [b'{"prompt": "x", "steps": NaN}', b'{"prompt": "x", "seed": Infinity}', b'{"prompt": "x", "cfg": -Infinity}',
             b'{"prompt": "x", "seed": 1e400}', b'{"prompt": "x", "num_images": ' + b'9' * 5000 + b'}',
             b'{"prompt": "x", "steps": ' + b'9' * 40 + b'}', b'[' * 100_000 + b']' * 100_000,
             b'{"prompt": "\\ud800 apple"}', b'{"prompt": "x", "negative_prompt": "\\udfff"}', b'\xff\xfe{}',
             b'{"prompt": "x", "\\ud800": 1}', b'{"prompt": "x", "steps": 1' + b'0' * 400 + b'}',
             b'{"prompt": "x", "cfg": [1' + b'0' * 400 + b', 1]}', b'{"prompt": "x", "seed": -1' + b'0' * 400 + b'}']
    for body in cases:
        status, out = post_json(gen, body)
        assert status == 400 and json.loads(out)['error'], (body[:40], status, out[:200])
    for steps in ('NaN', '1' + '0' * 400):
        body, headers = multipart({'prompt': 'x', 'steps': steps}, {'image': ('a.png', png_bytes((64, 64)))})
        assert call(srv.url + '/v1/edit', body, headers)[0] == 400
    body, headers = multipart({'prompt': 'x', 'size': '4096'}, {'image': ('a.png', png_bytes((64, 64)))})
    status, out = call(srv.url + '/v1/edit', body, headers)
    assert status == 400 and 'unknown field' in json.loads(out)['error']
    body, headers = multipart({}, {'image': ('a.png', png_bytes((64, 64))), 'prompt': ('p.txt', b'x')})
    assert call(srv.url + '/v1/edit', body, headers)[0] == 400        # a file where a field belongs
    assert call(gen)[0] == 405 and call(srv.url + '/v1/edit')[0] == 405
    # a chunked body (no Content-Length) is counted as it arrives
    chunk = b'a' * 2 ** 16
    status, out = raw(srv.url, 'POST /v1/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n'
                      'Transfer-Encoding: chunked', b''.join(b'%x\r\n%s\r\n' % (len(chunk), chunk) for _ in range(80)) + b'0\r\n\r\n')
    assert status == 413
    log = srv.log.read_text()[start:]                   # each mistake: one line, no traceback
    assert 'Traceback' not in log and log.count('400 POST /v1/generate') == len(cases)
    assert alive(srv.url)


def send_generate(port, steps):
    """A socket that has sent a whole /v1/generate request and not read the answer."""
    body = json.dumps({'prompt': 'red apple', 'steps': steps}).encode()
    s = socket.create_connection(('127.0.0.1', port))
    s.sendall(b'POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
              b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
    return s


def test_requests_whose_clients_leave_are_dropped(srv):
    """17 slow requests (50 steps) whose clients disconnect at once: the running one stops at its next step,
    the 16 queued are dropped, and a new request is served at once."""
    sockets = [send_generate(srv.port, 50) for _ in range(17)]
    time.sleep(1.0)
    assert srv.health()['in_progress_or_queued'] == 17
    for s in sockets:
        s.close()
    t0 = time.perf_counter()
    status, _ = post_json(srv.url + '/v1/generate', {'prompt': 'red apple', 'seed': 0}, timeout=60)
    elapsed = time.perf_counter() - t0
    print(f"served {elapsed:.2f} s after 17 clients left")
    assert status == 200 and elapsed < 2.0
    assert srv.health()['in_progress_or_queued'] == 0


def test_a_full_queue_refuses_at_once_and_the_page_still_loads(srv):
    """--queue 60 and 65 concurrent requests: 61 are taken (1 running + 60 waiting), the other 4 refused
    with 503 at once; the web page loads meanwhile."""
    t0 = time.perf_counter()
    sockets = [send_generate(srv.port, 50) for _ in range(65)]
    waiting, statuses = list(sockets), []
    while time.perf_counter() - t0 < 1.0:                   # the answers that come within a second
        ready, _, _ = select.select(waiting, [], [], max(0.0, 1.0 - (time.perf_counter() - t0)))
        for s in ready:
            statuses.append(s.recv(100).split(b' ')[1])
            waiting.remove(s)
            refused_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    page = call(srv.url + '/', timeout=30)
    page_s = time.perf_counter() - t0
    queued = srv.health()['in_progress_or_queued']
    for s in sockets:
        s.close()
    print(f"{len(statuses)} refused within {refused_s * 1000:.0f} ms; page loaded in {page_s:.2f} s with {queued} queued")
    assert statuses == [b'503'] * 4 and queued == 61
    assert page[0] == 200 and page_s < 2.0


def test_a_slow_client_cannot_hold_a_connection(srv):
    s = socket.create_connection(('127.0.0.1', srv.port))
    s.sendall(b'POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n')
    t0 = time.perf_counter()
    s.settimeout(10)
    try:
        while True:                    # a header line a second: more than --request-timeout 2 in all
            s.sendall(b'X-Slow: 1\r\n')
            time.sleep(1)
            if time.perf_counter() - t0 > 8:
                break
    except OSError:
        pass
    assert time.perf_counter() - t0 < 5
    s.close()


@pytest.mark.parametrize('flags, message', [
    (['--concurrency', '0'], '--concurrency must be at least 1'), (['--queue', '-5'], '--queue must be at least 0'),
    (['--max-body', '0'], '--max-body must be at least'), (['--max-steps', '0'], '--max-steps must be at least 1'),
    (['--port', '-1'], 'a port is a number from 1 to 65535'), (['--port', '70000'], 'a port is a number'),
    (['--wait', 'nan'], '--wait must be a number'), (['--max-steps', '1' + '0' * 400], '--max-steps must be a number'),
    (['--host', 'no-such-host.invalid'], 'not an address or a name'),
    (['--allowed-hosts', 'example.org:443'], 'without a port')])
def test_bad_flags_exit_2_with_a_message(flags, message):
    out = subprocess.run([sys.executable, '-m', 'paella.cli', 'serve', *flags], capture_output=True, text=True,
                         env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_cache_is_private_and_removed_at_exit(srv):
    """Web uploads and results go to the server's own folder (0700, files 0600), gone when it stops."""
    from gradio_client import Client, handle_file
    apple = srv.tmp / 'apple.png'
    apple.write_bytes(post_json(srv.url + '/v1/generate', {'prompt': 'red apple', 'seed': 0})[1])
    gallery = Client(srv.url + '/', verbose=False).predict(handle_file(str(apple)), 'tomato', 0.5, '', 0, 4, 1.5,
                                                          1.5, api_name='/edit')
    assert len(gallery) == 1
    folders = list(srv.tmp.glob('paella-serve-*'))
    assert len(folders) == 1 and folders[0].stat().st_mode & 0o777 == 0o700
    files = [p for p in folders[0].rglob('*') if p.is_file()]
    assert len(files) >= 2 and all(p.stat().st_mode & 0o077 == 0 for p in files)   # the upload and the result
    assert not (srv.tmp / 'gradio').exists()
    log = srv.stop()
    assert not folders[0].exists(), log
    assert 'api.gradio.app' not in log


def test_the_web_app_sends_no_analytics(monkeypatch, tmp_path):
    """Building the app starts neither Gradio's version check nor its analytics (they contact api.gradio.app)."""
    import gradio.analytics
    from paella.pipeline import Pipeline
    from paella.serve import app
    contacted = []
    for name in ('version_check', 'initiated_analytics', '_do_analytics_request'):
        monkeypatch.setattr(gradio.analytics, name, lambda *a, name=name, **k: contacted.append(name))
    for name in ('GRADIO_TEMP_DIR', 'GRADIO_EXAMPLES_CACHE', 'GRADIO_ANALYTICS_ENABLED'):
        monkeypatch.delenv(name, raising=False)            # restored after the test; `app` sets the first two
    app(Pipeline.from_pretrained(), cache_dir=str(tmp_path))
    assert contacted == []


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """A second server with a 1 MiB web cache (so that the budget is quick to reach)."""
    server = Server(tmp_path_factory.mktemp('small'), '--max-cache', str(2 ** 20))
    yield server
    server.stop()


def join(server, api_name, data, session):
    """Queue a web-app call as the page does; (fn_index, event_id)."""
    config = json.loads(call(server.url + '/config')[1])
    fn = next(i for i, d in enumerate(config['dependencies']) if d.get('api_name') == api_name)
    status, body = post_json(server.url + '/gradio_api/queue/join', {
        'data': data, 'fn_index': fn, 'trigger_id': None, 'event_data': None, 'session_hash': session})
    assert status == 200, body
    return fn, json.loads(body)['event_id']


def wait_until_free(server, limit=30):
    t0 = time.perf_counter()
    while server.health()['in_progress_or_queued'] and time.perf_counter() - t0 < limit:
        time.sleep(0.05)
    return time.perf_counter() - t0


def test_a_closed_page_drops_its_running_work(small):
    """A web request (8 images, 50 steps: seconds of work) whose page closes mid-way stops at once."""
    import httpx
    join(small, 'generate', ['red apple', 8, '', 0, 50, 1.5, 1.5, 'random'], 'leaving1')
    with httpx.stream('GET', small.url + '/gradio_api/queue/data?session_hash=leaving1', timeout=30) as r:
        for line in r.iter_lines():
            if '"progress"' in line:                 # sampling has started
                break
    elapsed = wait_until_free(small)
    print(f"the gate was free {elapsed:.2f} s after the page closed")
    assert elapsed < 1.5


def test_the_pages_stop_button_stops_the_work(small):
    """Gradio's own cancel (/gradio_api/cancel) stops the sampling too, not only the wait for it."""
    import threading
    import httpx
    fn, event = join(small, 'generate', ['red apple', 8, '', 0, 50, 1.5, 1.5, 'random'], 'stopping1')
    started = threading.Event()

    def read():
        with httpx.stream('GET', small.url + '/gradio_api/queue/data?session_hash=stopping1', timeout=60) as r:
            for line in r.iter_lines():
                if '"progress"' in line:
                    started.set()
    threading.Thread(target=read, daemon=True).start()
    assert started.wait(30)
    assert post_json(small.url + '/gradio_api/cancel', {'session_hash': 'stopping1', 'fn_index': fn,
                                                        'event_id': event})[0] == 200
    elapsed = wait_until_free(small)
    print(f"the gate was free {elapsed:.2f} s after the stop")
    assert elapsed < 1.5


def component_server(url, fields, data):
    body, headers = multipart({'session_hash': 's1', 'fn_name': 'accept_blobs', **fields}, {'file': ('blob', data)})
    return call(url + '/gradio_api/component_server', body, headers)


def test_the_image_editor_is_bounded(small):
    """The editor's piecewise uploads: a huge layer index, a non-image or oversized piece, and a request
    with many layers are refused before anything is decoded or stored."""
    config = json.loads(call(small.url + '/config')[1])
    editor = next(c['id'] for c in config['components'] if c.get('type') == 'imageeditor')
    before = small.health()['rss_mb']
    for fields, data in [({'type': 'layer', 'index': str(10 ** 8)}, png_bytes((64, 64))),
                         ({'type': 'layer', 'index': '00'}, png_bytes((64, 64))), ({'index': '0'}, png_bytes((64, 64))),
                         ({'type': 'background', 'index': 'null'}, b'not an image' * 1000),
                         ({'type': 'background', 'index': 'null'}, png_bytes((4000, 40)))]:
        status, _ = component_server(small.url, {'component_id': str(editor), 'id': 'e1', **fields}, data)
        assert status == 400, (fields, status)
    assert small.health()['rss_mb'] - before < 50
    upload = post_upload(small.url, png_bytes((64, 64)))
    piece = {'path': upload, 'meta': {'_type': 'gradio.FileData'}, 'orig_name': 'a.png'}
    t0 = time.perf_counter()
    events = gradio_call(small.url, 'inpaint', [{'background': piece, 'layers': [piece] * 50, 'composite': piece,
                                                 'id': None}, 'x', '', 0, 4, 1.5, 1.5, 'random'])
    assert events[-1][0] == 'event: error' and time.perf_counter() - t0 < 2.0


def post_upload(url, data, name='a.png', count=1):
    """Paths of files uploaded to the web app, or the status code if refused. ``data`` may be a function
    of the file's number (Gradio stores equal contents once)."""
    boundary = 'upload-boundary'
    content = data if callable(data) else lambda i: data
    body = b''.join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}{name}"\r\n'
                    f'Content-Type: image/png\r\n\r\n'.encode() + content(i) + b'\r\n' for i in range(count))
    status, out = call(url + '/gradio_api/upload', body + f'--{boundary}--\r\n'.encode(),
                       {'content-type': f'multipart/form-data; boundary={boundary}'})
    return json.loads(out)[0] if status == 200 and count == 1 else status


def test_links_are_not_fetched_and_unused_routes_are_closed(small):
    """A file object naming a URL is refused (Gradio would download it), and so are the routes that fetch
    URLs or re-encode video."""
    link = {'path': 'https://example.org/x.png', 'meta': {'_type': 'gradio.FileData'}}
    events = gradio_call(small.url, 'edit', [link, 'x', 0.5, '', 0, 4, 1.5, 1.5, 'random'])
    assert events[-1][0] == 'event: error'
    for path in ('/gradio_api/file=https://example.org/x.png', '/gradio_api/file/http://example.org/x.png',
                 '/gradio_api/proxy=https://x.hf.space/a',
                 '/gradio_api/process_recording'):
        assert call(small.url + path, b'' if 'process' in path else None)[0] == 404, path
    assert 'ssrf' not in small.log.read_text().lower() and 'example.org' not in small.log.read_text().split('404')[0]


def test_empty_uploads_cannot_fill_the_cache(small):
    """Files count as at least 4 KiB, and writers pass four at a time after a fresh measure: twelve parallel
    uploads of 100 tiny files against a 1 MiB budget store at most four uploads' worth; then uploads and
    the image editor's pieces are refused (507) while the server stays responsive."""
    folder = next(small.tmp.glob('paella-serve-*'))
    before = sum(1 for p in folder.rglob('*') if p.is_file())
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda k: post_upload(small.url, lambda i: b'%d-%d' % (k, i), count=100), range(12)))
    stored = sum(1 for p in folder.rglob('*') if p.is_file()) - before
    print(f"12 parallel uploads: {statuses.count(200)} stored, {statuses.count(507)} refused; {stored} tiny files")
    assert stored <= 400 and statuses.count(507) >= 8
    assert post_upload(small.url, png_bytes((8, 8))) == 507
    config = json.loads(call(small.url + '/config')[1])
    editor = next(c['id'] for c in config['components'] if c.get('type') == 'imageeditor')
    assert component_server(small.url, {'component_id': str(editor), 'id': 'e9', 'type': 'background',
                                        'index': 'null'}, png_bytes((64, 64)))[0] == 507
    t0 = time.perf_counter()
    assert small.health()['status'] == 'ok' and time.perf_counter() - t0 < 0.5


def test_idle_connections_do_not_lock_others_out(small):
    """150 connections that send nothing: everyone else is still served (they are closed after
    --request-timeout)."""
    idle = [socket.create_connection(('127.0.0.1', small.port)) for _ in range(150)]
    try:
        assert call(small.url + '/v1/health', timeout=10)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_made_up_sessions_do_not_grow_memory(small):
    """Gradio keeps state for every session id a client invents; this server keeps at most 200."""
    config = json.loads(call(small.url + '/config')[1])
    editor = next(c['id'] for c in config['components'] if c.get('type') == 'imageeditor')
    before = small.health()['rss_mb']
    for i in range(600):
        post_json(small.url + '/gradio_api/component_server',
                  {'data': {}, 'component_id': editor, 'session_hash': f'made-up-{i}', 'fn_name': 'nope'})
    grown = small.health()['rss_mb'] - before
    print(f"600 made-up sessions: +{grown:.0f} MiB")
    assert grown < 60


def test_a_client_leaving_as_its_slot_frees_runs_nothing():
    """The gate's race: a waiter cancelled in the same loop step in which it gets the slot must not run."""
    import asyncio
    from paella.serve.gate import Gate

    async def scenario():
        gate, ran = Gate(1, 4, 60), []

        def job(name, seconds):
            def run(cancel):
                ran.append(name)
                time.sleep(seconds)
            return run
        first = asyncio.ensure_future(gate.run(job('first', 0.2)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(gate.run(job('second', 0.2)))
        await asyncio.sleep(0.05)
        release = gate.slots.release

        def release_and_leave():
            release()
            asyncio.get_running_loop().call_soon(second.cancel)
        gate.slots.release = release_and_leave
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        return ran, gate.inside, gate.slots.locked()
    assert asyncio.run(scenario()) == (['first'], 0, False)


def test_the_banner_and_the_network_notice(monkeypatch, capsys):
    """The notice about other machines only for addresses that are not loopback; an IPv6 URL in brackets;
    no web app announced with --api-only."""
    from paella import cli
    from paella.serve import is_loopback, url_host
    assert all(is_loopback(h) for h in ('127.0.0.1', '127.0.0.2', 'localhost', '::1', '[::1]'))
    assert not any(is_loopback(h) for h in ('0.0.0.0', '::', '192.168.1.5', 'example.org'))
    assert url_host('::1') == '[::1]' and url_host('127.0.0.1') == '127.0.0.1'
    monkeypatch.setattr('paella.pipeline.Pipeline.from_pretrained', lambda *a, **k: None)
    served = []
    monkeypatch.setattr('paella.serve.serve', lambda *a, **k: served.append((a, k)))
    for argv, web, notice in [(['--host', '::1', '--api-only'], False, False), (['--host', 'localhost'], True, False),
                              (['--host', '0.0.0.0'], True, True)]:
        assert cli.main(['serve', '--port', '7999', *argv]) == 0
        out, err = capsys.readouterr()
        assert ('(web app)' in out) == web and ('reachable from other machines' in err) == notice, (argv, out, err)
    assert 'http://[::1]:7999/v1/generate' in cli_banner(['--host', '::1'], monkeypatch, capsys)
    assert served[0][1]['with_web'] is False and served[0][1]['hosts'][-1] == '[::1]'


def cli_banner(argv, monkeypatch, capsys):
    from paella import cli
    cli.main(['serve', '--port', '7999', *argv])
    return capsys.readouterr().out
