"""mtp-engine: multi-token-prediction language models on Triton kernels."""
from .checkpoint import load_checkpoint, save_checkpoint
from .generate import Generator
from .llama import Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["ModelArgs", "Transformer", "load_checkpoint", "save_checkpoint", "Tokenizer", "Llama", "Generator"]
