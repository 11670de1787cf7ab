"""`paella serve`: a web app (Gradio, at /) and an HTTP API (/v1) over one pipeline, safe to run.

Map: `limits` (what a request may ask, checked before any work), `gate` (concurrency, queue, cancellation),
`service` (the pipeline behind the gate), `api` (/v1), `web` (the Gradio tabs), `guard` (host, origin,
body-size and disk checks in front of both), `server` (the app, its private folder, uvicorn).
Importing this package is cheap: Gradio, FastAPI and uvicorn load only when an app is built.
"""
from .limits import HOST, BadRequest, Busy, Limits
from .server import allowed_hosts, app, check_listen_address, is_loopback, serve, url_host

__all__ = ['HOST', 'BadRequest', 'Busy', 'Limits', 'allowed_hosts', 'app', 'check_listen_address', 'is_loopback',
           'serve', 'url_host']
