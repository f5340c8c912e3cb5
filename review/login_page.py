"""The sign-in page carries nothing but the sign-in form.

Gradio 6 renders the API description of the app (``window.gradio_api_info``: every named endpoint, the labels of its
components, client snippets) into *every* HTML page it serves, the anonymous sign-in page included: its page route
decides about the sign-in for ``window.gradio_config`` only. An anonymous visitor would so learn the whole API of a
clinical app before signing in. :class:`AnonymousPageFilter` (an ASGI middleware, installed through ``launch(...,
app_kwargs=...)``) empties that description in every HTML page whose configuration says ``auth_required`` -- the
page Gradio serves to a visitor it did not sign in -- and leaves signed-in pages, the API itself and streamed
responses untouched. The decision "signed in or not" stays Gradio's own: the filter only reads what Gradio wrote.
"""
from __future__ import annotations

import json
import re

from starlette.middleware import Middleware

__all__ = ["AnonymousPageFilter", "anonymous_page_middleware", "strip_api_info"]

_API_INFO = re.compile(rb"(window\.gradio_api_info\s*=\s*)(.*?)(;?\s*</script>)", re.S)
_CONFIG = re.compile(rb"window\.gradio_config\s*=\s*(.*?);?\s*</script>", re.S)
EMPTY_API_INFO = b'{"named_endpoints":{},"unnamed_endpoints":{}}'


def _needs_sign_in(html: bytes) -> bool:
    m = _CONFIG.search(html)
    if m is None:
        return False
    try:
        return bool(json.loads(m.group(1)).get("auth_required"))
    except (ValueError, AttributeError):
        # a page whose configuration cannot be read is treated as a sign-in page: emptying too much is harmless
        return True


def strip_api_info(html: bytes) -> bytes:
    """``html`` with an empty API description when it is a sign-in page (``auth_required``), else unchanged.
    Gradio escapes ``<`` inside the JSON it embeds, so the description ends at the first ``</script>``."""
    if not _needs_sign_in(html):
        return html
    return _API_INFO.sub(lambda m: m.group(1) + EMPTY_API_INFO + m.group(3), html)


class AnonymousPageFilter:
    """ASGI middleware: buffers HTML responses only (pages are small; event streams and files pass through as they
    come) and runs :func:`strip_api_info` over them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def filtered_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers") or ()).get(b"content-type", b"")
                if not ctype.startswith(b"text/html"):
                    await send(message)
                    return
                start = message                       # held back until the body is complete
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = strip_api_info(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers") or () if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, filtered_send)


def anonymous_page_middleware() -> Middleware:
    """The filter as a Starlette ``Middleware`` entry for ``FastAPI(middleware=[...])``."""
    return Middleware(AnonymousPageFilter)
