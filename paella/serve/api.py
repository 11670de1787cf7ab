"""The HTTP API, mounted at /v1: ``POST /generate`` (JSON), ``POST /edit`` (multipart: an ``image`` file and
fields), ``GET /health``. Images come back as one PNG (several images: one row).

Every mistake a client can make is a 4xx with ``{"error": "<a sentence>"}`` and one log line; 503 (busy)
carries ``Retry-After``. A client that disconnects takes its queued or running work with it."""
import asyncio
import contextlib
import json
import logging

from starlette.responses import Response

from .limits import BadRequest, Busy

log = logging.getLogger('paella.serve')
NUMERIC = ('seed', 'steps', 'cfg', 'strength')         # multipart fields that carry JSON numbers


def rss_mb():
    """Resident memory of this process in MiB (Linux), or None."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def png(images):
    """PNG bytes of one image, or of a horizontal row of several."""
    from ..images import grid_of, png_bytes
    return png_bytes(grid_of(images, cols=len(images)) if len(images) > 1 else images[0])


def parse_json(raw, what='the body'):
    """JSON as the standard says it: no NaN / Infinity, no numbers Python cannot hold, bounded nesting."""
    def constant(name):
        raise BadRequest(f"{what} holds {name}, which is not a JSON number")
    try:
        return json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not UTF-8 text") from None
    except BadRequest:
        raise
    except ValueError:                                   # an integer of thousands of digits
        raise BadRequest(f"{what} holds a number too long to read") from None


def require_type(request, expected):
    got = request.headers.get('content-type', '').split(';')[0].strip().lower()
    if got != expected:
        raise BadRequest(f"send the body as {expected} (got {got or 'no content type'})", status=415)


async def until_disconnected(request):
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())['type'] != 'http.disconnect':
        pass


async def answer(request, work):
    """A PNG response for ``work`` (a coroutine giving images), or nothing if the client leaves first: then
    the work is cancelled (dropped from the queue, or stopped at its next sampling step)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.info("%s %s: the client left; its work was dropped", request.method, request.url.path)
        return Response(status_code=499)                  # nobody reads it
    gone.cancel()
    return Response(await asyncio.to_thread(png, task.result()), media_type='image/png')


def api(service):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title='paella', docs_url=None, redoc_url=None, openapi_url='/openapi.json')

    @app.exception_handler(BadRequest)
    async def bad_request(request, e):
        log.warning("%d %s %s: %s", e.status, request.method, request.url.path, e)
        return JSONResponse({'error': str(e)}, status_code=e.status)

    @app.exception_handler(Busy)
    async def busy(request, e):
        return JSONResponse({'error': str(e)}, status_code=503, headers={'retry-after': '1'})

    @app.post('/generate')
    async def generate(request: Request):
        require_type(request, 'application/json')
        return await answer(request, service.generate(parse_json(await request.body())))

    @app.post('/edit')
    async def edit(request: Request):
        require_type(request, 'multipart/form-data')
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:                           # Starlette's MultiPartException and broken bodies
            raise BadRequest(f"the multipart body could not be read: {e}") from None
        upload, fields = form.get('image'), {}
        if upload is None or isinstance(upload, str):
            raise BadRequest("the 'image' file field is missing")
        for key, value in form.multi_items():
            if key == 'image':
                continue
            if not isinstance(value, str):
                raise BadRequest(f"{key} must be a plain form field, not a file")
            try:
                fields[key] = parse_json(value, key) if key in NUMERIC else value
            except BadRequest:
                raise BadRequest(f"{key} must be a number, got {value[:40]!r}") from None
        return await answer(request, service.edit(await upload.read(), fields))

    @app.get('/health')
    async def health():
        return {'status': 'ok', 'in_progress_or_queued': service.gate.inside, 'rss_mb': rss_mb()}

    return app
