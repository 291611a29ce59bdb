"""Models on attnkit attention, and loaders for real pretrained checkpoints.

* :class:`BertEncoder`: BERT-family encoders and sentence embeddings (all-MiniLM-L6-v2, ...);
* :class:`DecoderLM`: Llama-family decoder-only language models (Llama, Mistral, SmolLM);
* :class:`Gemma3LM`: Gemma 3's text decoder (local sliding-window and global layers);
* :class:`Seq2Seq`: the encoder-decoder Transformer for translation and summarization.

Each loads and saves its own checkpoints (``config.json`` + ``model.safetensors``), and the
decoders and BERT read Hugging Face directories directly. :func:`load` takes any of them by
path, GGUF files included, and returns the model with its tokenizer.
"""

from .bert import BertConfig, BertEncoder
from .gemma3 import Gemma3Config, Gemma3LM
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
    "Gemma3Config",
    "Gemma3LM",
    "LoadedModel",
    "SamplingConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Tokenizer",
    "load",
]
