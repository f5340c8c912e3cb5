"""Codecs for NEURAL artifacts (kept separate from the container in :mod:`neural_core.artifact`).

* :mod:`.lossless` - registry of lossless image codecs for the patch mosaic (PNG, WebP, JPEG 2000, JPEG-LS,
  JPEG XL), each with a header probe used before decoding, and :func:`encode_smallest` (choose by measurement).
* :mod:`.jpeg_dct` - JPEG sources pruned in the DCT domain (the source's own quantised coefficients).
* :mod:`.lossy` - the optional lossy context layer and rate-matched whole-image baselines
  (:func:`encode_to_budget`: JPEG, WebP, JPEG 2000, JPEG XL at most ``B`` bytes, decoded again).
"""
from .jpeg_dct import JPEG_BLOCK, JPEG_ENCODINGS, decode_jpeg_section, encode_jpeg_mosaic, is_jpeg
from .lossless import LOSSLESS_CODECS, LosslessCodec, decode_image, encode_smallest, register_lossless
from .lossy import CONTEXT_ENCODINGS, LOSSY_CODECS, CodecResult, LossyCodec, decode_context, encode_context, \
    encode_to_budget

__all__ = ["JPEG_BLOCK", "JPEG_ENCODINGS", "decode_jpeg_section", "encode_jpeg_mosaic", "is_jpeg", "LOSSLESS_CODECS",
           "LosslessCodec", "decode_image", "encode_smallest", "register_lossless", "CONTEXT_ENCODINGS",
           "LOSSY_CODECS", "CodecResult", "LossyCodec", "decode_context", "encode_context", "encode_to_budget"]
