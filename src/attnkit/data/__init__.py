"""Real corpora, built offline from Debian's archive, and subword tokenizers.

- :func:`build_translation_corpus`: en→de/fr/es sentence pairs from the LibreOffice help pages.
- :func:`build_summarization_corpus`: package description → synopsis pairs.
- :func:`train_tokenizer`: a shared BPE vocabulary trained on a training split.

Corpora are written as ``{train,valid,test}.jsonl`` + ``meta.json`` under :func:`cache_root`.
"""

from ._apt import DataError
from .corpus import SPLITS, Pair, cache_root, load_pairs, read_meta, split_of
from .debian import build_summarization_corpus, parse_descriptions
from .libreoffice import LANGUAGES, build_translation_corpus, page_texts, pair_pages
from .subword import SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "LANGUAGES",
    "SPECIAL_TOKENS",
    "SPLITS",
    "DataError",
    "Pair",
    "build_summarization_corpus",
    "build_translation_corpus",
    "cache_root",
    "load_pairs",
    "page_texts",
    "pair_pages",
    "parse_descriptions",
    "read_meta",
    "split_of",
    "train_tokenizer",
]
