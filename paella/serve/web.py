"""The web app (Gradio): one tab per mode, all built from the `MODES` table, all calling `Service.run`.

Safety, in Gradio's own terms: its file-path checks run (they are skipped until `has_launched`), uploads
and results live in this server's private folder and are deleted after ``CACHE_AGE`` seconds, no analytics,
and unexpected errors show a plain sentence instead of developer text. Uploaded images reach the modes as
files of that folder and are decoded inside the gate, after their header passed the size check.
"""
import asyncio
import contextlib
import html
import inspect
import logging
import os

from .gate import Cancelled
from .limits import BadRequest, Busy
from .service import Upload

log = logging.getLogger('paella.serve')
CACHE_AGE = 600                       # seconds a web result or upload stays downloadable
CSS = """
.small-result img { image-rendering: pixelated; }
"""


def _image_input(gr, label):
    from .widgets import Image
    # 'filepath' with no image_mode: Gradio reads the header only and hands over its cached file
    return Image(label=label, type='filepath', image_mode=None, sources=['upload', 'clipboard'])


def text_to_image(gr, lim, pipe):
    inputs = [gr.Textbox(label='prompt', value='red apple', max_length=lim.max_prompt, elem_id='prompt'),
              gr.Slider(1, lim.max_images, value=1, step=1, label='images')]

    async def call(svc, ask, prompt, n, **sampling):
        n = svc.fields.integer(n, 'the number of images', 1, lim.max_images)
        return await svc.run(svc.pipe, [svc.fields.prompt(prompt)] * n, **sampling)
    return inputs, call


def inpaint(gr, lim, pipe):
    from .widgets import ImageEditor
    # a white brush under a token wide (3 px at 4 px a token, 12 at 16): Gradio's default (1/50 of the canvas,
    # at least 25 px) covers most of a small picture
    editor = ImageEditor(label='image: paint the part to regenerate', type='filepath', image_mode='RGBA',
                         elem_id='inpaint-editor', sources=['upload', 'clipboard'], layers=False, transforms=(),
                         brush=gr.Brush(default_size=max(2, pipe.pixels_per_token * 3 // 4), colors=['#ffffff'],
                                        color_mode='fixed'))
    inputs = [editor, gr.Textbox(label='prompt', max_length=lim.max_prompt, elem_id='inpaint-prompt')]

    async def call(svc, ask, value, prompt, **sampling):
        value = value or {}
        image, layers = ask(value.get('background'), 'upload an image, then paint the part to regenerate'), \
            [ask(layer, mode='RGBA') for layer in value.get('layers') or []]
        prompt = svc.fields.prompt(prompt)

        def masked(image, *layers, **kw):
            import numpy as np
            painted = [np.asarray(layer)[..., 3] > 0 for layer in layers]
            if not painted or not np.any(painted):
                raise BadRequest("paint over the part of the image to regenerate")
            return svc.pipe.inpaint(image.convert('RGB'), np.any(painted, axis=0), prompt, **kw)
        return await svc.run(masked, image, *layers, **sampling)
    return inputs, call


def outpaint(gr, lim, pipe):
    m, (w, h) = pipe.pixel_multiple, pipe.image_size        # canvas sides: multiples of m (128 px at 256)
    top = max(m, lim.max_size - lim.max_size % m)
    inputs = [_image_input(gr, 'image'), gr.Textbox(label='prompt', max_length=lim.max_prompt),
              gr.Slider(m, top, value=min(2 * w, top), step=m, label='canvas width'),
              gr.Slider(m, top, value=min(h, top), step=m, label='canvas height'),
              gr.Dropdown(['center', 'left', 'right', 'top', 'bottom'], value='center', label='position')]

    async def call(svc, ask, image, prompt, width, height, position, **sampling):
        size = svc.fields.canvas(width, height, svc.pipe.pixel_multiple)
        return await svc.run(svc.pipe.outpaint, ask(image), svc.fields.prompt(prompt), size, position, **sampling)
    return inputs, call


def variations(gr, lim, pipe):
    inputs = [_image_input(gr, 'image'), gr.Slider(1, lim.max_images, value=4, step=1, label='images'),
              gr.Slider(0, 1, value=0.6, label='strength (models without CLIP)')]

    async def call(svc, ask, image, n, strength, **sampling):
        f = svc.fields
        n, strength = f.integer(n, 'the number of images', 1, lim.max_images), f.number(strength, 'strength', 0, 1)
        return await svc.run(svc.pipe.variations, ask(image), n, '', strength, **sampling)
    return inputs, call


def interpolate(gr, lim, pipe):
    inputs = [gr.Textbox(label='first prompt', value='red apple', max_length=lim.max_prompt),
              gr.Textbox(label='last prompt', value='green apple', max_length=lim.max_prompt),
              gr.Slider(2, lim.max_images, value=5, step=1, label='images'),
              gr.Radio(['linear', 'slerp'], value='slerp', label='method')]

    async def call(svc, ask, a, b, n, method, seed=None, **sampling):
        f = svc.fields
        n = f.integer(n, 'the number of images', 2, lim.max_images)
        return await svc.run(svc.pipe.interpolate, f.prompt(a, 'the first prompt'), f.prompt(b, 'the last prompt'),
                             n, method, seed=seed or 0, **sampling)
    return inputs, call


def edit(gr, lim, pipe):
    inputs = [_image_input(gr, 'image'), gr.Textbox(label='prompt', max_length=lim.max_prompt),
              gr.Slider(0, 1, value=0.5, label='strength')]

    async def call(svc, ask, image, prompt, strength, **sampling):
        f = svc.fields
        return await svc.run(svc.pipe.edit, ask(image), f.prompt(prompt), f.number(strength, 'strength', 0, 1),
                             **sampling)
    return inputs, call


# tab label, button, Gradio API name, the function that builds the inputs and the call
MODES = [('text to image', 'Generate', 'generate', text_to_image), ('inpaint', 'Inpaint', 'inpaint', inpaint),
         ('outpaint', 'Outpaint', 'outpaint', outpaint), ('variations', 'Vary', 'variations', variations),
         ('interpolate', 'Interpolate', 'interpolate', interpolate), ('edit', 'Edit', 'edit', edit)]


def settings(gr, lim, pipe):
    """The controls every mode shares, in an accordion."""
    cfg = pipe.settings.cfg
    start, end = (0.0, 0.0) if cfg is None else (cfg, cfg) if isinstance(cfg, (int, float)) else cfg
    with gr.Accordion('settings', open=False):
        return [gr.Textbox(label='negative prompt', max_length=lim.max_prompt),
                gr.Number(label='seed (-1: random)', value=0, precision=0),
                gr.Slider(1, lim.max_steps, value=pipe.settings.steps, step=1, label=f'steps (1-{lim.max_steps})'),
                gr.Slider(0, 30, value=float(start), step=0.05, label='cfg at the first step'),
                gr.Slider(0, 30, value=float(end), step=0.05, label='cfg at the last step'),
                gr.Dropdown(list(pipe.renoise_rules), value=pipe.settings.renoise_rule,
                            label='re-noising: which tokens go back to noise after each step')]


def blocks(service, cache_dir):
    import gradio as gr
    lim = service.limits
    root = os.path.realpath(cache_dir)

    def ask(path, missing='upload an image first', mode='RGB'):
        """An uploaded file Gradio cached for us -> `Upload`; refused if it lies outside our folder."""
        if not path:
            raise BadRequest(missing)
        if os.path.commonpath([root, os.path.realpath(path)]) != root or not os.path.isfile(path):
            raise BadRequest("that file was not uploaded to this server")
        return Upload(path, service.fields, mode)

    def handler(call, n_inputs):
        async def run(*values):
            inputs, (negative, seed, steps, cfg, cfg_end, renoise, request, progress) = (values[:n_inputs],
                                                                                      values[n_inputs:])
            try:
                sampling = service.fields.sampling({
                    'seed': None if seed is None or seed < 0 else seed, 'steps': steps, 'negative_prompt': negative,
                    # equal ends as one number, so that 0 keeps meaning "no guidance"
                    'cfg': cfg if cfg == cfg_end else [cfg, cfg_end], 'renoise': renoise})
                steps = sampling.get('steps', service.pipe.settings.steps)
                return await while_open(demo, request.session_hash, call(
                    service, ask, *inputs, **sampling, callback=lambda i, _: progress((i + 1) / steps, desc='sampling')))
            except (BadRequest, Busy) as e:
                log.warning("web app: %s", e)
                raise gr.Error(html.escape(_sentence(str(e))), print_exception=False) from None
            except Cancelled:
                return None
        # Gradio hands over the request and a progress bar to positional parameters it recognises by their
        # annotation and default: spell them out for a function of any number of inputs
        P = inspect.Parameter
        names = [f'input{i}' for i in range(n_inputs)] + ['negative', 'seed', 'steps', 'cfg', 'cfg_end', 'renoise']
        run.__signature__ = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in names] + [
            P('request', P.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
            P('progress', P.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
        run.__annotations__ = {'request': gr.Request}
        return run

    with gr.Blocks(title='paella', analytics_enabled=False, delete_cache=(60, CACHE_AGE)) as demo:
        gr.Markdown('# paella\nText-to-image in a quantized latent space. Results download from the gallery.')
        for label, button_label, api_name, build in MODES:
            with gr.Tab(label), gr.Row():
                with gr.Column():
                    inputs, call = build(gr, lim, service.pipe)
                    for component in inputs:
                        if hasattr(component, 'check_size'):
                            component.check_size = service.fields.image_size
                    controls = settings(gr, lim, service.pipe)
                    button = gr.Button(button_label, variant='primary', elem_id=api_name)
                # pictures of 256 px and more at their own size (scaled down only where larger than a cell):
                # never cropped, never blown up into a blur; smaller ones (64 px) fill the cell, pixelated
                large = min(service.pipe.image_size) >= 256
                out = gr.Gallery(label='result', columns=2, height=480, format='png', elem_id=f'{api_name}-gallery',
                                 object_fit='scale-down' if large else 'contain',
                                 elem_classes=None if large else 'small-result')
                # one Gradio queue for every tab (not one per button): one request preprocessed at a time
                button.click(handler(call, len(inputs)), [*inputs, *controls], out, api_name=api_name,
                             concurrency_id='generation')
    # Gradio's queue holds the web app's waiting requests (dropped when the page closes); the gate does
    # the rest, shared with the API
    demo.queue(max_size=max(1, lim.queue), default_concurrency_limit=lim.concurrency)
    return demo


async def while_open(demo, session, work):
    """``work``'s result, or None if the page that asked for it closes first: then it is cancelled (dropped
    from the gate's queue, or stopped at its next sampling step). Gradio's queue marks a session's events
    dead when its page's event stream closes (``Event.alive``, gradio 6.31); we look every quarter second."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and not any(event.alive for job in demo._queue.active_jobs if job
                                           for event in job if event.session_hash == session):
                log.info("web app: the page closed; its work was dropped")
                break
        else:
            return task.result()
    except asyncio.CancelledError:             # Gradio's own cancel (the page's stop): stop the work too
        await _stop(task)
        raise
    await _stop(task)
    return None


async def _stop(task):
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Cancelled):
        await task


def _sentence(text):
    return text[:1].upper() + text[1:] + ('' if text.endswith(('.', '!', '?')) else '.')


def mount(app, service, cache_dir):
    """Mount the web app at / with its files in ``cache_dir`` and its path checks on."""
    # Gradio reads where its files go from the environment: at import, when the app is built, at every request
    os.environ['GRADIO_TEMP_DIR'] = cache_dir
    os.environ['GRADIO_EXAMPLES_CACHE'] = os.path.join(cache_dir, 'examples')
    import gradio as gr
    demo = blocks(service, cache_dir)
    # Gradio keeps per-session state for every session id a client makes up (~170 KB each, 10 000 by
    # default; read when the app is mounted); this app keeps no gr.State, so a few hundred is plenty
    demo.state_session_capacity = 200
    app = gr.mount_gradio_app(app, demo, path='/', max_file_size=service.limits.max_body, show_error=False,
                              footer_links=[], run_history=False, css=CSS)
    # Gradio checks that a file a request names was uploaded to it only once the app has "launched";
    # a mounted app never launches, so without this any path on the machine would be copied and served
    demo.has_launched = True
    return app
