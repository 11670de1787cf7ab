"""Gradio's image inputs, bounded for a server anyone on the network may reach (gradio 6.31).

- Uploads only: a file object whose path is a URL would make Gradio download it (any public address, any
  size) into the server's folder. Refused.
- The image editor keeps the pieces a page sends (`accept_blobs`) in memory until the request that uses
  them, trusting the layer index it is given (an index of 10^8 grows a list of 10^8 entries) and never
  forgetting them; it also decodes every layer before our own checks run. Here: one drawing layer, a few
  pending edits at most, forgotten once used, and every piece's size read from its header first.
"""
import gradio as gr
from gradio.components.base import server
from gradio_client import utils as client_utils

from .limits import BadRequest

PENDING_EDITS = 8                   # editor uploads kept for requests still to come; older ones are dropped
MAX_PIECE = 2 * 2 ** 20             # bytes of one piece (a 512 x 512 RGBA PNG is well under)
# (the class names stay Gradio's: the page picks its widget by the lower-cased class name)


def _refuse(message):
    raise gr.Error(message, print_exception=False)


def _bad_piece(message):
    """The editor's pieces come through Gradio's component route, where only an HTTP error is a 4xx."""
    from fastapi import HTTPException
    raise HTTPException(status_code=400, detail=message)


class UploadsOnly:
    """Mixed into a file component: no file object may name a URL."""

    def _no_link(self, path):
        if path is not None and client_utils.is_http_url_like(str(path)):
            _refuse("Send the picture as an upload, not as a link.")

    def move_resource_to_block_cache(self, url_or_file_path):
        self._no_link(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        self._no_link(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)


class Image(UploadsOnly, gr.Image):
    pass


class ImageEditor(UploadsOnly, gr.ImageEditor):
    """``check_size`` (set after construction: Gradio turns constructor arguments into page settings) is
    `Fields.image_size`: bytes or a path -> BadRequest when over the limits."""
    check_size = None

    def _check(self, data):
        try:
            self.check_size(data if isinstance(data, bytes) else data.path)
        except BadRequest as e:
            _refuse(str(e)[:1].upper() + str(e)[1:] + '.')

    @server
    def accept_blobs(self, data):
        piece = data.data
        kind, index, files = piece.get('type'), piece.get('index'), data.files
        if kind not in ('background', 'layer', 'composite') or not piece.get('id') or len(files) != 1:
            _bad_piece("an editor piece needs a type, an id and one file")
        if kind == 'layer' and index not in (None, 'null', 0, '0'):
            _bad_piece("this editor has one drawing layer")
        if len(files[0][1]) > MAX_PIECE:
            _bad_piece(f"an editor piece is at most {MAX_PIECE} bytes")
        try:
            self.check_size(files[0][1])
        except BadRequest as e:
            _bad_piece(str(e))
        while len(self.blob_storage) >= PENDING_EDITS and piece['id'] not in self.blob_storage:
            self.blob_storage.pop(next(iter(self.blob_storage)))           # the oldest unfinished edit
        return super().accept_blobs(data)

    def preprocess(self, payload):
        if payload is None:
            return None
        source = self.blob_storage.get(payload.id) if payload.id is not None else payload
        if source is not None:
            layers = [layer for layer in source.layers or [] if layer is not None]
            if len(layers) > 1:
                _refuse("This editor has one drawing layer.")
            for piece in (source.background, *layers, source.composite):
                if piece is not None:
                    self._check(piece)
        try:
            return super().preprocess(payload)
        finally:
            if payload.id is not None:
                self.blob_storage.pop(payload.id, None)
