"""The ASGI app and the uvicorn server around it.

The web app's files (uploads and results) live in a private folder of this server (mode 0700, files
0600), created at start and removed at exit, never in the temp folder every Gradio app on the host shares.
"""
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager

from .limits import Limits

log = logging.getLogger('paella.serve')
LOOPBACK = ['127.0.0.1', 'localhost', '[::1]']


def is_loopback(host):
    if host == 'localhost':
        return True
    return _is_address(host) and ipaddress.ip_address(host.strip('[]')).is_loopback


def _is_address(name):
    try:
        ipaddress.ip_address(name.strip('[]'))                   # 10.0.0.5, ::1, [::1]
        return True
    except ValueError:
        return False


def check_listen_address(host, port):
    """ValueError unless ``host`` is an address or a name this machine resolves (checked before the model
    loads, not when uvicorn binds)."""
    import socket
    try:
        socket.getaddrinfo(host.strip('[]'), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(f"--host {host!r}: not an address or a name this machine can resolve") from None


def url_host(host):
    """``host`` as it goes in a URL (IPv6 in brackets)."""
    return f'[{host}]' if ':' in host and not host.startswith('[') else host


def allowed_hosts(host, extra=()):
    """Names the Host header may carry: loopback, the address listened on (unless a wildcard), ``extra``
    (bare names or addresses, or '*'); ValueError for a name with a port or a path."""
    for name in extra:
        if name != '*' and not _is_address(name) and (not name or any(c in name for c in ':/@ ')):
            raise ValueError(f"--allowed-hosts {name!r}: give a bare host name or address, without a port or path")
    names = list(LOOPBACK)
    if host not in ('0.0.0.0', '::', ''):
        names.append(url_host(host).lower())
    return list(dict.fromkeys(names + [url_host(h).lower() for h in extra]))


def app(pipe, limits=None, with_web=True, hosts=None, cache_dir=None):
    """The ASGI app: the /v1 API, the Gradio app at / (``with_web``; its files in ``cache_dir``), behind
    the host, origin, body and cache checks of `guard`."""
    from fastapi import FastAPI
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from .api import api
    from .guard import Guard
    from .service import Service
    service = Service(pipe, limits)
    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.mount('/v1', api(service))
    if with_web:
        from .web import mount
        if cache_dir is None:
            raise ValueError("the web app needs a private cache_dir for its files (see `private_folder`)")
        root = mount(root, service, cache_dir)
    guarded = Guard(root, service.limits.max_body, cache_dir if with_web else None, service.limits.max_cache)
    return TrustedHostMiddleware(guarded, allowed_hosts=hosts or LOOPBACK, www_redirect=False)


@contextmanager
def private_folder():
    """A folder only this process's user can read, removed (with everything in it) on the way out."""
    old = os.umask(0o077)                 # every file this server writes from now on: 0600
    path = tempfile.mkdtemp(prefix='paella-serve-')
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.umask(old)


def protocol(timeout):
    """uvicorn's h11 protocol with a deadline for each request to arrive: uvicorn's own keep-alive timer
    stops at the first byte, so a client sending one header byte a second could hold a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Deadline(H11Protocol):
        deadline = None

        def _arm(self):
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(timeout, self._expire)

        def _expire(self):
            # IDLE: the request line or headers are incomplete; SEND_BODY: the body is
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)
    return Deadline


def serve(pipe, host='127.0.0.1', port=7860, limits=None, with_web=True, hosts=None):
    import uvicorn
    from PIL import Image
    limits = limits or Limits()
    # Pillow refuses to open (from the header) an image of more than 2 * MAX_IMAGE_PIXELS pixels. Gradio's
    # image editor decodes uploads before our own checks see them, so bound what it may decode: 16 MiB.
    Image.MAX_IMAGE_PIXELS = (4 * limits.max_size) ** 2 // 2
    logging.basicConfig(format='paella serve: %(message)s', level=logging.WARNING)
    # uvicorn shuts down on SIGTERM and then raises it again: make that an exit through the `finally`s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with private_folder() as cache_dir:
        asgi = app(pipe, limits, with_web, hosts or allowed_hosts(host), cache_dir)
        config = uvicorn.Config(asgi, host=host.strip('[]'), port=port, log_level='warning',
                                http=protocol(limits.request_timeout), timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
