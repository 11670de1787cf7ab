"""One pipeline behind the gate: validated requests in, images out. Both the HTTP API and the web app call
`Service.run`, so they share one concurrency bound, one queue and one set of limits."""
from .gate import Gate, stop_when
from .limits import BadRequest, Fields, Limits


class Upload:
    """An uploaded image: its header is checked at once (cheap, before queueing), its pixels are decoded
    later, inside the gate."""

    def __init__(self, data, fields, mode='RGB'):
        self.data, self.fields, self.mode = data, fields, mode
        fields.image_size(data)

    def decode(self):
        return self.fields.image(self.data, self.mode)


class Service:
    def __init__(self, pipe, limits=None):
        self.pipe, self.limits = pipe, limits or Limits()
        self.fields = Fields(self.limits, pipe.renoise_rules)
        self.gate = Gate(self.limits.concurrency, self.limits.queue, self.limits.wait)

    async def run(self, fn, *args, callback=None, **kwargs):
        """``fn(*args, **kwargs)`` once the gate lets it through, with `Upload` arguments decoded there and a
        sampler callback that stops the work if the caller goes away. A ValueError from the pipeline is the
        caller's mistake: `BadRequest`."""
        def job(cancel):
            try:
                decoded = [a.decode() if isinstance(a, Upload) else a for a in args]
                return fn(*decoded, callback=stop_when(cancel, callback), **kwargs)
            except BadRequest:
                raise
            except ValueError as e:
                raise BadRequest(str(e)) from None
        return await self.gate.run(job)

    async def generate(self, p, callback=None):
        """``{"prompt", "negative_prompt", "seed", "steps", "cfg", "renoise", "num_images"}`` -> a list of
        images."""
        if not isinstance(p, dict):
            raise BadRequest('the body must be a JSON object such as {"prompt": "red apple"}')
        _only(p, {'prompt', 'negative_prompt', 'seed', 'steps', 'cfg', 'renoise', 'num_images'})
        f = self.fields
        prompt = f.prompt(p.get('prompt'))
        n = f.integer(p.get('num_images'), 'num_images', 1, self.limits.max_images, default=1)
        return await self.run(self.pipe, [prompt] * n, callback=callback, **f.sampling(p))

    async def edit(self, image, p, callback=None):
        """An uploaded image and ``{"prompt", "strength", ...sampling}`` -> the edited image."""
        _only(p, {'prompt', 'negative_prompt', 'seed', 'steps', 'cfg', 'renoise', 'strength'})
        f = self.fields
        upload, prompt = Upload(image, f), f.prompt(p.get('prompt'))
        strength = f.number(p.get('strength'), 'strength', 0, 1, default=0.5)
        return await self.run(self.pipe.edit, upload, prompt, strength, callback=callback, **f.sampling(p))


def _only(p, known):
    unknown = set(p) - known
    if unknown:
        names = ', '.join(ascii(k) for k in sorted(unknown))     # ascii: a key may hold a lone surrogate
        raise BadRequest(f"unknown field(s): {names[:200]}; known: {', '.join(sorted(known))}")
