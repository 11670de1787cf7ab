"""ASGI middleware in front of everything the server answers (API and web app alike).

- Host: only the names in ``hosts`` (loopback by default), with Starlette's `TrustedHostMiddleware`.
  A DNS-rebinding page reaches us under its own name, so it is refused here.
- Origin: a browser names the page that sent a request; one from another site (or ``null``) gets 403, so
  a page the user visits cannot drive the server (the app has no login, so this is its CSRF defence).
- Body size: over ``max_body`` bytes is 413, by Content-Length before reading, or counted as a chunked body
  arrives (the app is then told the client left, and whatever it answers is dropped).
- Disk: requests that store files (uploads, the image editor's pieces) pass four at a time and are refused
  (507) while the web app's folder holds more than ``max_cache`` bytes (every file counted as at least one
  4 KiB block) or ``MAX_FILES`` files.
- Gradio routes this server does not use are 404: fetching a URL through the server (``file=http...``,
  ``file/http...``, ``proxy=``) and re-encoding screen recordings.
"""
import asyncio
import json
import logging
import os
import re
from urllib.parse import urlsplit

log = logging.getLogger('paella.serve')
WRITERS = ('/gradio_api/upload', '/gradio_api/component_server')   # routes that store files
MAX_FILES = 4096
UNUSED = re.compile(r'(^|/)(file[=/]\s*https?:|proxy=|process_recording)', re.IGNORECASE)


async def refuse(send, status, message, headers=()):
    body = json.dumps({'error': message}).encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                            (b'connection', b'close'), *headers]})
    await send({'type': 'http.response.body', 'body': body})


def same_origin(origin, host_header):
    """True if the browser's Origin header names this server as the client reached it (its Host header)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ('http', 'https') and bool(parts.netloc) and parts.netloc.lower() == host_header.lower()


def folder_usage(path):
    """(bytes, files) under ``path``, each file counted as at least one 4 KiB block."""
    total = count = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += max(4096, os.lstat(os.path.join(root, name)).st_size)
                count += 1
            except OSError:
                pass
    return total, count


class Budget:
    """The web app's folder against its size and file budget. Requests that write into it (uploads, the
    image editor's pieces) pass four at a time, each after a fresh measure (made in a thread: a folder of
    many files takes a while to walk, and the event loop must not wait for it), so parallel writers cannot
    overshoot the budget together."""

    def __init__(self, path, max_bytes, max_files=MAX_FILES):
        self.path, self.max_bytes, self.max_files = path, max_bytes, max_files
        self.writers = asyncio.Semaphore(4)

    async def over(self):
        size, files = await asyncio.to_thread(folder_usage, self.path)
        return size > self.max_bytes or files > self.max_files


class Guard:
    def __init__(self, app, max_body, cache_dir=None, max_cache=None):
        self.app, self.max_body = app, max_body
        self.budget = Budget(cache_dir, max_cache) if cache_dir is not None else None

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get('headers') or []}
        where = f"{scope['method']} {scope['path'][:200]}"
        if UNUSED.search(scope['path']):
            log.warning("404 %s: a Gradio route this server does not offer", where)
            return await refuse(send, 404, "not found")
        origin = headers.get(b'origin')
        if origin is not None and not same_origin(origin.decode('latin-1'), headers.get(b'host', b'').decode('latin-1')):
            log.warning("403 %s: refused a request sent by another site's page (Origin %s)", where,
                        origin.decode('latin-1')[:100])
            return await refuse(send, 403, "requests from other sites' pages are not accepted")
        length = headers.get(b'content-length')
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            log.warning("413 %s: body of %s bytes", where, length.decode('latin-1')[:30])
            return await refuse(send, 413, f"the request body is over the limit of {self.max_body} bytes")
        if scope['path'] not in WRITERS or self.budget is None:
            return await self._counted(scope, receive, send, where)
        async with self.budget.writers:
            if await self.budget.over():
                log.warning("507 %s: the upload folder is full", where)
                return await refuse(send, 507, "the server holds too many uploads right now; try again in a few minutes")
            return await self._counted(scope, receive, send, where)

    async def _counted(self, scope, receive, send, where):
        """Pass the request on, counting its body; past the limit answer 413 and cut the app off."""
        seen, started, refused = 0, False, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {'type': 'http.disconnect'}
            message = await receive()
            seen += len(message.get('body', b''))
            if seen > self.max_body:
                refused = True
                log.warning("413 %s: body over %d bytes", where, self.max_body)
                if not started:
                    await refuse(send, 413, f"the request body is over the limit of {self.max_body} bytes")
                return {'type': 'http.disconnect'}
            return message

        async def watched(message):
            nonlocal started
            if refused:                            # our 413 was the answer; drop the app's
                return
            started = started or message['type'] == 'http.response.start'
            await send(message)
        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not refused:                        # the app failed on a body we cut short: expected
                raise
