"""What a request may ask for, and the one-line errors when it asks for more.

Everything a client sends is checked here before any work is queued: numbers must be finite and in range,
text must be real Unicode within the length limit, and an uploaded image's size is read from its header
before a single pixel is decoded (a 140 KB PNG can declare 12000x12000 pixels: 432 MB once decoded).
"""
import io
from dataclasses import dataclass, fields

from .. import checks
from ..checks import is_number, short as _short

HOST = '127.0.0.1'
FORMATS = ('PNG', 'JPEG', 'WEBP', 'GIF', 'BMP')     # decoders an upload may reach


@dataclass
class Limits:
    max_steps: int = 50             # sampling steps per request
    max_size: int = 512             # largest canvas / uploaded image side, pixels
    max_images: int = 8             # images per request
    max_prompt: int = 300           # characters per prompt
    max_body: int = 4 * 2 ** 20     # bytes per request body
    concurrency: int = 1            # generations running at once
    queue: int = 16                 # requests waiting for a slot; more are refused (503)
    wait: float = 120.0             # seconds a queued request may wait before it is refused (503)
    request_timeout: float = 30.0   # seconds a client may take to send its request (headers and body)
    max_cache: int = 256 * 2 ** 20  # bytes the web app's uploads and results may hold on disk

    # the smallest value that still lets the server do anything useful
    LOWEST = {'max_steps': 1, 'max_size': 16, 'max_images': 1, 'max_prompt': 1, 'max_body': 1024,
              'concurrency': 1, 'queue': 0, 'wait': 0.1, 'request_timeout': 0.5, 'max_cache': 2 ** 20}

    def __post_init__(self):
        for f in fields(self):
            value, lo = getattr(self, f.name), self.LOWEST[f.name]
            if not is_number(value):
                raise ValueError(f"{f.name} must be a number, got {_short(value)}")
            if value < lo:
                raise ValueError(f"{f.name} must be at least {lo}, got {value}")


class BadRequest(ValueError):
    """Over a limit or malformed: HTTP 400 (or ``status``: 413 too large, 415 wrong content type)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Busy(RuntimeError):
    """No slot and no room in the queue: HTTP 503."""


class Fields:
    """Validation of request fields against `Limits`: the library's own checks (`paella.checks`, the same
    sentences as the CLI and the Python API), each returning the clean value or raising `BadRequest`."""

    def __init__(self, limits, rules=checks.RENOISE_RULES):
        self.limits, self.rules = limits, tuple(rules)      # rules: the re-noising rules the model can run

    def prompt(self, value, name='prompt', required=True):
        if value is None and not required:
            return ''
        return _request(checks.text, value, name, self.limits.max_prompt, required)

    def number(self, value, name, lo, hi, default=None, integer=False):
        return default if value is None else _request(checks.number, value, name, lo, hi, integer)

    def integer(self, value, name, lo, hi, default=None):
        return self.number(value, name, lo, hi, default, integer=True)

    def cfg(self, value):
        """A guidance scale: a number, or [start, end] for a linear schedule over the steps."""
        return _request(checks.schedule, value, 'cfg', 0, 30)

    def renoise(self, value):
        """A re-noising rule's name (which tokens go back to noise after each step)."""
        return _request(checks.choice, value, 'renoise', self.rules)

    def sampling(self, p):
        """The fields every mode takes (seed, steps, cfg, renoise, negative_prompt) -> pipeline keyword
        arguments."""
        out = {'seed': _request(checks.seed, p.get('seed')),                 # None: a random seed
               'negative_prompt': self.prompt(p.get('negative_prompt'), 'negative_prompt', required=False)}
        for key, value in (('steps', self.integer(p.get('steps'), 'steps', 1, self.limits.max_steps)),
                           ('cfg', None if p.get('cfg') is None else self.cfg(p.get('cfg'))),
                           ('renoise_rule', None if p.get('renoise') is None else self.renoise(p.get('renoise')))):
            if value is not None:
                out[key] = value
        return out

    def canvas(self, width, height, multiple):
        """(width, height) of an outpainting canvas: within the size limit and a multiple the model takes."""
        w, h = (self.integer(v, name, multiple, self.limits.max_size)
                for v, name in ((width, 'canvas width'), (height, 'canvas height')))
        if w % multiple or h % multiple:
            up = [-(-v // multiple) * multiple for v in (w, h)]
            raise BadRequest(f"the canvas sides must be multiples of {multiple} pixels for this model: "
                             f"{w}x{h} could be {up[0]}x{up[1]}")
        return w, h

    def image_size(self, data):
        """(width, height) of an upload (bytes, or a file the server itself holds) read from its header
        alone; `BadRequest` if it is not an image or is over the size limit. Nothing is decoded."""
        with self._open(data) as im:
            return im.size

    def image(self, data, mode='RGB'):
        """An upload decoded (as ``mode``), once its header has passed `image_size`'s checks."""
        with self._open(data) as im:
            try:
                from ..images import flatten
                return flatten(im) if mode == 'RGB' else im.convert(mode)   # transparency on white
            except (OSError, SyntaxError, ValueError):      # a header that lies about the data
                raise BadRequest(self._unreadable) from None

    @property
    def _unreadable(self):
        n = self.limits.max_size
        return f"the upload is not a readable image: send a PNG, JPEG, WebP, GIF or BMP picture of at most {n}x{n} pixels"

    def _open(self, data):
        from PIL import Image, UnidentifiedImageError
        limit = self.limits.max_size
        try:
            im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data, formats=FORMATS)
        except Image.DecompressionBombError:        # so large that Pillow refuses to open it at all
            raise BadRequest(f"the image is far larger than the limit of {limit} pixels per side") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError):
            raise BadRequest(self._unreadable) from None
        if max(im.size) > limit:
            im.close()
            raise BadRequest(f"the image is {im.size[0]}x{im.size[1]} pixels; the limit is {limit} pixels per side")
        return im


def _request(check, *args):
    """A `paella.checks` check whose TypeError / ValueError is the client's mistake: `BadRequest` (400)."""
    try:
        return check(*args)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
