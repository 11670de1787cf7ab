"""`paella serve`: a Gradio app and an HTTP API over one pipeline, safe to share.

- Web app (``/``): text-to-image, inpainting with a drawn mask, outpainting, variations, interpolation and
  editing; a progress bar while sampling; results downloadable from the gallery.
- HTTP API: ``POST /v1/generate`` (JSON) and ``POST /v1/edit`` (multipart: an image file + fields) return a
  PNG (several images: one grid); ``GET /v1/health`` reports the queue and the process memory.
- `Limits`: steps, canvas and upload sides, images per request, prompt length and request body size;
  over a limit is a 4xx with a message. A `Gate` lets ``concurrency`` generations run and ``queue`` wait;
  anything beyond is refused at once with 503 (the web app's queue: "queue is full"), so load does not pile
  up memory. Listens on 127.0.0.1 unless told otherwise.
"""
import io
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass

HOST = '127.0.0.1'


@dataclass
class Limits:
    max_steps: int = 50
    max_size: int = 512             # largest canvas / uploaded image side, pixels
    max_images: int = 8             # images per request
    max_prompt: int = 300           # characters per prompt
    max_body: int = 4 * 2 ** 20     # bytes per request body
    concurrency: int = 1            # generations running at once
    queue: int = 16                 # requests waiting for a slot; more are refused (503)
    wait: float = 120.0             # seconds a queued request may wait before it is refused (503)


class BadRequest(ValueError):
    """Over a limit or malformed: HTTP 400 (413 for a body too large)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Busy(RuntimeError):
    """No slot and no room in the queue: HTTP 503."""


class Gate:
    """At most ``concurrency`` holders at once and ``queue`` waiting; others raise `Busy` immediately."""

    def __init__(self, concurrency=1, queue=16, wait=120.0):
        self.slots, self.lock = threading.Semaphore(concurrency), threading.Lock()
        self.capacity, self.wait, self.inside = concurrency + queue, wait, 0

    @contextmanager
    def __call__(self):
        with self.lock:
            if self.inside >= self.capacity:
                raise Busy(f"the server is busy ({self.inside} requests in progress or queued); try again later")
            self.inside += 1
        try:
            if not self.slots.acquire(timeout=self.wait):
                raise Busy(f"waited {self.wait:.0f} s for a free slot; try again later")
            try:
                yield
            finally:
                self.slots.release()
        finally:
            with self.lock:
                self.inside -= 1


def rss_mb():
    """Resident memory of this process in MiB (Linux), or None."""
    try:
        for line in open('/proc/self/status'):
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


class Service:
    """Validated calls into the pipeline, each through the gate."""

    def __init__(self, pipe, limits=None):
        self.pipe, self.limits = pipe, limits or Limits()
        self.gate = Gate(self.limits.concurrency, self.limits.queue, self.limits.wait)

    # --- validation -----------------------------------------------------------------------------------
    def prompt(self, value, name='prompt', required=True):
        if value is None and not required:
            return ''
        if not isinstance(value, str) or (required and not value.strip()):
            raise BadRequest(f"{name} must be a non-empty string" if required else f"{name} must be a string")
        if len(value) > self.limits.max_prompt:
            raise BadRequest(f"{name} is {len(value)} characters; the limit is {self.limits.max_prompt}")
        return value

    def integer(self, value, name, lo, hi, default=None):
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise BadRequest(f"{name} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise BadRequest(f"{name} must be between {lo} and {hi}, got {value}")
        return int(value)

    def number(self, value, name, lo, hi, default=None):
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{name} must be a number, got {value!r}")
        if not lo <= value <= hi:
            raise BadRequest(f"{name} must be between {lo} and {hi}, got {value}")
        return float(value)

    def sampling(self, p):
        """Common fields: seed, steps, cfg, negative_prompt -> keyword arguments for the pipeline."""
        out = {'seed': self.integer(p.get('seed'), 'seed', 0, 2 ** 63 - 1),
               'negative_prompt': self.prompt(p.get('negative_prompt'), 'negative_prompt', required=False)}
        steps = self.integer(p.get('steps'), 'steps', 1, self.limits.max_steps)
        cfg = p.get('cfg')
        if isinstance(cfg, list) and len(cfg) == 2:                   # [start, end]: a linear schedule
            cfg = tuple(self.number(v, 'cfg', 0, 30) for v in cfg)
        elif isinstance(cfg, list):
            raise BadRequest(f"cfg must be a number or [start, end], got {cfg!r}")
        else:
            cfg = self.number(cfg, 'cfg', 0, 30)
        out.update({k: v for k, v in (('steps', steps), ('cfg', cfg)) if v is not None})
        return out

    def image(self, data):
        from .editing import load_image
        try:
            image = load_image(data)
        except ValueError as e:
            raise BadRequest(f"the upload: {e}") from None
        if max(image.size) > self.limits.max_size:
            raise BadRequest(f"the image is {image.size[0]}x{image.size[1]}; the limit is "
                             f"{self.limits.max_size} pixels per side")
        return image

    def size(self, w, h):
        w, h = (self.integer(v, name, 1, self.limits.max_size) for v, name in ((w, 'width'), (h, 'height')))
        return w, h

    # --- calls ----------------------------------------------------------------------------------------
    def run(self, fn, *args, **kwargs):
        """Run a pipeline call through the gate; ValueError from the pipeline is a bad request."""
        with self.gate():
            try:
                return fn(*args, **kwargs)
            except ValueError as e:
                raise BadRequest(str(e)) from None

    def generate(self, p, callback=None):
        if not isinstance(p, dict):
            raise BadRequest("the body must be a JSON object such as {\"prompt\": \"red apple\"}")
        unknown = set(p) - {'prompt', 'negative_prompt', 'seed', 'steps', 'cfg', 'num_images'}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        prompt = self.prompt(p.get('prompt'))
        n = self.integer(p.get('num_images'), 'num_images', 1, self.limits.max_images, default=1)
        return self.run(self.pipe, [prompt] * n, callback=callback, **self.sampling(p))

    def edit(self, image_bytes, p, callback=None):
        image = self.image(image_bytes)
        strength = self.number(p.get('strength'), 'strength', 0, 1, default=0.5)
        return self.run(self.pipe.edit, image, self.prompt(p.get('prompt')), strength, callback=callback,
                        **self.sampling(p))


def _cfg_ends(cfg):
    """A model's cfg setting (None, a number or a (start, end) pair) -> (start, end) for the web sliders."""
    if cfg is None:
        return 0.0, 0.0
    return (float(cfg), float(cfg)) if isinstance(cfg, (int, float)) else tuple(float(v) for v in cfg)


def png(images):
    """PNG bytes of one image, or of a horizontal grid of several."""
    from PIL import Image
    if len(images) > 1:
        w, h = images[0].size
        sheet = Image.new('RGB', (w * len(images), h), 'white')
        for i, im in enumerate(images):
            sheet.paste(im, (i * w, 0))
        images = [sheet]
    buf = io.BytesIO()
    images[0].save(buf, 'PNG')
    return buf.getvalue()


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (by Content-Length, or counted)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope.get('headers') or []).get(b'content-length')
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get('body', b''))
            if seen > self.limit:
                raise BodyLimit.TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message['type'] == 'http.response.start'
            await send(message)
        try:
            await self.app(scope, counted, watched)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({'error': f"request body over the limit of {self.limit} bytes"}).encode()
        await send({'type': 'http.response.start', 'status': 413,
                    'headers': [(b'content-type', b'application/json'),
                                (b'content-length', str(len(body)).encode()), (b'connection', b'close')]})
        await send({'type': 'http.response.body', 'body': body})


def api(service):
    """The FastAPI app with the /v1 endpoints (the web app is mounted on it by `app`)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title='paella', docs_url='/v1/docs', openapi_url='/v1/openapi.json')

    def error(status, message):
        return JSONResponse({'error': message}, status_code=status)

    async def answer(fn, *args):
        try:
            return Response(png(await run_in_threadpool(fn, *args)), media_type='image/png')
        except BadRequest as e:
            return error(e.status, str(e))
        except Busy as e:
            return error(503, str(e))

    @app.post('/v1/generate')
    async def generate(request: Request):
        try:
            body = json.loads(await request.body() or b'null')
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"malformed JSON: {e}")
        return await answer(service.generate, body)

    @app.post('/v1/edit')
    async def edit(request: Request):
        try:
            form = await request.form()
        except Exception as e:                      # not multipart / broken multipart
            return error(400, f"expected multipart/form-data with an 'image' file: {e}")
        upload = form.get('image')
        if upload is None or not hasattr(upload, 'read'):
            return error(400, "missing the 'image' file field")
        fields = {}
        for k, v in form.items():
            if k == 'image':
                continue
            try:
                fields[k] = json.loads(v) if k in ('seed', 'steps', 'cfg', 'strength') else v
            except json.JSONDecodeError:
                return error(400, f"{k} must be a number, got {v!r}")
        return await answer(service.edit, await upload.read(), fields)

    @app.get('/v1/health')
    async def health():
        return {'status': 'ok', 'in_progress_or_queued': service.gate.inside, 'rss_mb': rss_mb()}

    return app


def web(service):
    """The Gradio Blocks app."""
    import gradio as gr
    import numpy as np

    lim, pipe = service.limits, service.pipe

    def progress_callback(progress, steps):
        return lambda i, _: progress((i + 1) / steps, desc='sampling')

    def guarded(fn):
        def run(*args, progress=gr.Progress()):
            try:
                return fn(progress, *args)
            except (BadRequest, Busy) as e:
                raise gr.Error(str(e))
        return run

    def fields(seed, steps, cfg, cfg_end, negative):
        """The settings controls as request fields (a negative seed: random; cfg linear from cfg to cfg_end)."""
        # equal ends as one number, so that 0 keeps meaning "no guidance" (as in `sample`)
        cfg = float(cfg) if cfg == cfg_end else [float(cfg), float(cfg_end)]
        return {'seed': None if seed is None or seed < 0 else int(seed), 'steps': int(steps), 'cfg': cfg,
                'negative_prompt': negative}

    def common(progress, seed, steps, cfg, cfg_end, negative):
        """Validated sampling keyword arguments, with the progress bar as the sampler's callback."""
        return dict(service.sampling(fields(seed, steps, cfg, cfg_end, negative)),
                    callback=progress_callback(progress, int(steps)))

    def text_to_image(progress, prompt, negative, seed, steps, cfg, cfg_end, n):
        return service.generate({'prompt': prompt, 'num_images': int(n),
                                 **fields(seed, steps, cfg, cfg_end, negative)},
                                callback=progress_callback(progress, int(steps)))

    def inpaint(progress, editor, prompt, negative, seed, steps, cfg, cfg_end):
        if not editor or editor.get('background') is None:
            raise BadRequest("upload an image and paint the part to regenerate")
        image = service.image(editor['background'])
        alpha = [np.asarray(layer.convert('RGBA'))[..., 3] > 0 for layer in editor.get('layers') or []]
        if not alpha or not np.any(alpha):
            raise BadRequest("paint over the part of the image to regenerate")
        mask = np.any(alpha, axis=0)
        return service.run(pipe.inpaint, image, mask, service.prompt(prompt),
                           **common(progress, seed, steps, cfg, cfg_end, negative))

    def outpaint(progress, image, prompt, width, height, position, negative, seed, steps, cfg, cfg_end):
        image = service.image(image)
        size = service.size(int(width), int(height))
        return service.run(pipe.outpaint, image, service.prompt(prompt), size, position,
                           **common(progress, seed, steps, cfg, cfg_end, negative))

    def variations(progress, image, n, strength, negative, seed, steps, cfg, cfg_end):
        image = service.image(image)
        n = service.integer(int(n), 'images', 1, lim.max_images)
        return service.run(pipe.variations, image, n, '', float(strength),
                           **common(progress, seed, steps, cfg, cfg_end, negative))

    def interpolate(progress, a, b, n, method, negative, seed, steps, cfg, cfg_end):
        n = service.integer(int(n), 'images', 2, lim.max_images)
        kw = service.sampling(fields(seed, steps, cfg, cfg_end, negative))
        kw['seed'] = kw['seed'] or 0
        return service.run(pipe.interpolate, service.prompt(a, 'first prompt'), service.prompt(b, 'last prompt'),
                           n, method, **kw)

    def edit(progress, image, prompt, strength, negative, seed, steps, cfg, cfg_end):
        return service.run(pipe.edit, service.image(image), service.prompt(prompt), float(strength),
                           **common(progress, seed, steps, cfg, cfg_end, negative))

    def controls():
        with gr.Accordion('settings', open=False):
            negative = gr.Textbox(label='negative prompt', max_length=lim.max_prompt)
            seed = gr.Number(label='seed (-1: random)', value=0, precision=0)
            steps = gr.Slider(1, lim.max_steps, value=pipe.settings.steps, step=1, label='steps')
            # the model's default may be a (start, end) schedule: one slider for each end
            start, end = _cfg_ends(pipe.settings.cfg)
            cfg = gr.Slider(0, 15, value=start, step=0.05, label='cfg (first step)')
            cfg_end = gr.Slider(0, 15, value=end, step=0.05, label='cfg (last step)')
        return [negative, seed, steps, cfg, cfg_end]

    def gallery(elem_id=None):
        return gr.Gallery(label='result', columns=4, height=360, object_fit='contain', format='png', elem_id=elem_id)

    with gr.Blocks(title='paella') as demo:
        gr.Markdown('# paella\nText-to-image in a quantized latent space. Results download from the gallery.')
        with gr.Tab('text to image'):
            prompt = gr.Textbox(label='prompt', value='red apple', max_length=lim.max_prompt, elem_id='prompt')
            n = gr.Slider(1, lim.max_images, value=1, step=1, label='images')
            rest = controls()
            button = gr.Button('Generate', variant='primary', elem_id='generate')
            out = gallery('gallery')
            button.click(guarded(text_to_image), [prompt, *rest, n], out,
                         api_name='generate')
        with gr.Tab('inpaint'):
            editor = gr.ImageEditor(label='image: paint the part to regenerate', type='pil')
            prompt = gr.Textbox(label='prompt', max_length=lim.max_prompt)
            rest = controls()
            button = gr.Button('Inpaint', variant='primary')
            out = gallery()
            button.click(guarded(inpaint), [editor, prompt, *rest], out, api_name='inpaint')
        with gr.Tab('outpaint'):
            image = gr.Image(label='image', type='pil')
            prompt = gr.Textbox(label='prompt', max_length=lim.max_prompt)
            width = gr.Number(label='canvas width', value=128, precision=0)
            height = gr.Number(label='canvas height', value=64, precision=0)
            position = gr.Dropdown(['center', 'left', 'right', 'top', 'bottom'], value='center', label='position')
            rest = controls()
            button = gr.Button('Outpaint', variant='primary')
            out = gallery()
            button.click(guarded(outpaint), [image, prompt, width, height, position, *rest], out, api_name='outpaint')
        with gr.Tab('variations'):
            image = gr.Image(label='image', type='pil')
            n = gr.Slider(1, lim.max_images, value=4, step=1, label='images')
            strength = gr.Slider(0, 1, value=0.6, label='strength (models without CLIP)')
            rest = controls()
            button = gr.Button('Vary', variant='primary')
            out = gallery()
            button.click(guarded(variations), [image, n, strength, *rest], out, api_name='variations')
        with gr.Tab('interpolate'):
            a = gr.Textbox(label='first prompt', value='red apple', max_length=lim.max_prompt)
            b = gr.Textbox(label='last prompt', value='green apple', max_length=lim.max_prompt)
            n = gr.Slider(2, lim.max_images, value=5, step=1, label='images')
            method = gr.Radio(['linear', 'slerp'], value='slerp', label='method')
            rest = controls()
            button = gr.Button('Interpolate', variant='primary')
            out = gallery()
            button.click(guarded(interpolate), [a, b, n, method, *rest], out, api_name='interpolate')
        with gr.Tab('edit'):
            image = gr.Image(label='image', type='pil')
            prompt = gr.Textbox(label='prompt', max_length=lim.max_prompt)
            strength = gr.Slider(0, 1, value=0.5, label='strength')
            rest = controls()
            button = gr.Button('Edit', variant='primary')
            out = gallery()
            button.click(guarded(edit), [image, prompt, strength, *rest], out, api_name='edit')
    # Gradio's own queue: as many running and waiting as the gate allows; a full queue is refused.
    demo.queue(max_size=lim.queue, default_concurrency_limit=lim.concurrency)
    return demo


def app(pipe, limits=None, with_web=True):
    """The ASGI app: the /v1 API, the Gradio app at / (``with_web``), and the body-size limit."""
    service = Service(pipe, limits)
    fastapi_app = api(service)
    if with_web:
        import gradio as gr
        fastapi_app = gr.mount_gradio_app(fastapi_app, web(service), path='/', max_file_size=service.limits.max_body)
    return BodyLimit(fastapi_app, service.limits.max_body)


def serve(pipe, host=HOST, port=7860, limits=None, with_web=True):
    import uvicorn
    uvicorn.run(app(pipe, limits, with_web), host=host, port=port, log_level='warning')
