"""Turn pixels and captions into L2-normalised embeddings, as fast as exactness allows.

CLIP's text tower is causal and pools at the end-of-text token, so tokens after the longest
caption in a batch never influence any pooled embedding. Cutting the batch to that length gives
the same embeddings at a fraction of the cost. open_clip's ``encode_text`` always adds all
``context_length`` positional embeddings, so the short forward is written here over the model's
own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipguard.model.loading import LoadedModel, precision_dtype


@dataclass
class TokenizedCaptions:
    tokens: torch.Tensor  # [batch, context_length] int64
    n_tokens: list[int]  # length before truncation, start and end tokens included
    truncated: list[bool]


def tokenize(tokenizer, captions: list[str]) -> TokenizedCaptions:
    """Tokenize with the model's tokenizer, recording which captions the context cut."""
    tokens = tokenizer(captions)
    context = tokens.shape[1]
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        # SimpleTokenizer: count BPE tokens before the context cut, plus start/end tokens.
        lengths = [len(encode(caption)) + 2 for caption in captions]
    else:
        lengths = [int((row != 0).sum()) for row in tokens]
    return TokenizedCaptions(tokens=tokens, n_tokens=lengths, truncated=[n > context for n in lengths])


def encode_images(loaded: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """[batch, 3, H, W] preprocessed pixels -> [batch, dim] float32 unit vectors."""
    dtype = precision_dtype(loaded.info.precision)
    with torch.inference_mode():
        features = loaded.model.encode_image(pixels.to(loaded.info.device, dtype, non_blocking=True))
    return F.normalize(features.float(), dim=-1).cpu()


def encode_texts(loaded: LoadedModel, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """[batch, context] tokens -> [batch, dim] float32 unit vectors."""
    tokens = tokens.to(loaded.info.device, non_blocking=True)
    with torch.inference_mode():
        if trim and supports_trimmed_text(loaded.model):
            features = encode_text_trimmed(loaded.model, tokens)
        else:
            features = loaded.model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1).cpu()


def supports_trimmed_text(model: torch.nn.Module) -> bool:
    """Only the classic causal CLIP text tower that pools at the argmax (end-of-text) token."""
    return (
        getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and hasattr(model, "token_embedding")
        and hasattr(model, "positional_embedding")
    )


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # The end-of-text token has the highest id, so argmax finds it; +1 keeps it inside the cut.
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
