"""Report tokenizer: our own small WordPiece vocabulary trained with ``tokenizers`` on radiology text, or the
tokenizer of a T5 / Clinical-T5 checkpoint directory.

Special tokens follow T5: ``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1, ``<unk>`` = 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import ModelLoadError

SPECIALS = ["<pad>", "</s>", "<unk>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a lower-cased WordPiece tokenizer; every encoded report ends with ``</s>``."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=40))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS)
    tok.train_from_iterator((t for t in texts if t and t.strip()), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load our tokenizer directory or the tokenizer of a local T5 checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {err}") from err


def decode_clean(tokenizer, ids) -> str:
    """Decoded text without special tokens and with WordPiece spacing around punctuation tidied."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for p in (" .", " ,", " :", " ;"):
        text = text.replace(p, p.strip())
    return text.strip()
