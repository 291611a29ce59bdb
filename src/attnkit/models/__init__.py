"""Models on attnkit attention, and loaders for real pretrained checkpoints.

* :class:`BertEncoder`: BERT-family encoders and sentence embeddings (all-MiniLM-L6-v2, ...);
* :class:`DecoderLM`: Llama-family decoder-only language models (Llama, Mistral);
* :class:`Seq2Seq`: the encoder-decoder Transformer for translation and summarization.

Each loads and saves its own checkpoints (``config.json`` + ``model.safetensors``), and the
first two read Hugging Face directories directly. :func:`load` takes any of them by path and
returns the model with its tokenizer.
"""

from .bert import BertConfig, BertEncoder
from .generation import SamplingConfig
from .llama import DecoderLM, DecoderLMConfig
from .loading import LoadedModel, load
from .seq2seq import Seq2Seq, Seq2SeqConfig
from .tokenizer import Tokenizer

__all__ = [
    "BertConfig",
    "BertEncoder",
    "DecoderLM",
    "DecoderLMConfig",
    "LoadedModel",
    "SamplingConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Tokenizer",
    "load",
]
