"""The NEURAL Review reader app's logic, behind the thin Gradio factory in ``app.py``.

- :mod:`review.controller`: :class:`ReviewController` (every event as a plain method) and :class:`ReviewState`;
- :mod:`review.gallery`: the example gallery (SYNTHETIC phantoms + configured real studies) and manifest readers;
- :mod:`review.layout`: the page's components (no events), CSS;
- :mod:`review.render`, :mod:`review.figures`, :mod:`review.windowing`: what the page draws;
- :mod:`review.editor`: the correction brush (Gradio ImageEditor adapters);
- :mod:`review.util`: message escaping, upload paths.

``review`` may import :mod:`neural_core` and :mod:`db`; neither imports ``review``.
"""
from .controller import EXPLAIN_STEPS, LOCAL_READER, OUTPUTS, ReviewController, ReviewState
from .gallery import GALLERY_ENV, GalleryEntry, load_gallery

__all__ = ["ReviewController", "ReviewState", "OUTPUTS", "LOCAL_READER", "EXPLAIN_STEPS", "GalleryEntry",
           "load_gallery", "GALLERY_ENV"]
