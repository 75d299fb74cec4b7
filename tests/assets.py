"""Test assets come from PyPI packages through mistral_ext.assets, cached in $MISTRAL_EXT_CACHE."""

from mistral_ext.assets import mistral_v1_tokenizer

__all__ = ["mistral_v1_tokenizer"]
