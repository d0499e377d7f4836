"""Text conditioning as AUTOMATIC1111 computes it (modules/sd_hijack_clip.py and friends).

A prompt text becomes weighted fragments (the attention parser), fragments become BPE tokens, tokens are packed into
75-token chunks (BOS + 75 + EOS = 77, comma backtrack, BREAK, textual-inversion vectors counted as tokens), each
chunk goes through the text encoder(s) separately, the hidden states are multiplied by the fragment weights and the
original mean is restored ("Original" emphasis); chunks are concatenated on the token axis. SD1 honours clip skip,
SD2 uses the penultimate layer + final norm, SDXL concatenates CLIP-L and OpenCLIP-bigG penultimate states and takes
the pooled vector from bigG on the first chunk.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Iterator, Sequence

import torch
from instant_clip_tokenizer import Tokenizer

from sdstudio.models.embeddings import Embedding
from sdstudio.prompt.parser import parse_attention

CHUNK_LENGTH = 75          # tokens per chunk between BOS and EOS
BOS, EOS = 49406, 49407    # CLIP's <start_of_text>, <end_of_text>
COMMA = 267                # ",</w>"
OPEN_CLIP_PAD = 0          # OpenCLIP pads after the first EOS with 0; CLIP-L pads with EOS
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


class EmbeddingLookup:
    """Embeddings indexed by the token ids of their names: first id -> [(ids, embedding)], longest first (A1111)."""

    def __init__(self, embeddings: Sequence[Embedding]):
        self._index: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in embeddings:
            ids = tokenize(embedding.name)
            if ids:
                self._index.setdefault(ids[0], []).append((ids, embedding))
        for entries in self._index.values():
            entries.sort(key=lambda item: len(item[0]), reverse=True)

    def find_at(self, tokens: Sequence[int], position: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's tokens start at `position` (longest match), and how many tokens it spans."""
        for ids, embedding in self._index.get(tokens[position], ()):
            if list(tokens[position:position + len(ids)]) == ids:
                return embedding, len(ids)
        return None, 0


@cache
def tokenizer() -> Tokenizer:
    """The real CLIP BPE tokenizer (vocabulary shipped by the instant-clip-tokenizer package)."""
    return Tokenizer()


def tokenize(text: str) -> list[int]:
    """BPE token ids of `text` without BOS/EOS (lower-cased as CLIP does)."""
    return list(tokenizer().encode(text))


@dataclass
class PromptChunk:
    """75 tokens (+BOS/EOS once finished), their weights, and embeddings placed at token offsets."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


@dataclass
class ChunkedPrompt:
    chunks: list[PromptChunk]
    token_count: int                      # tokens used (embeddings count their vectors)
    embeddings: list[Embedding]           # the embeddings used, in order of appearance


def chunk_prompt(text: str, embeddings: EmbeddingLookup | None = None, comma_backtrack: int = 20,
                 emphasis: str = "Original") -> ChunkedPrompt:
    """A1111 `tokenize_line`: one prompt text (no AND, no scheduling left) -> finished 77-token chunks."""
    fragments = parse_attention(text) if emphasis != "None" else [(text, 1.0)]
    chunks: list[PromptChunk] = []
    used: list[Embedding] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma, token_count
        token_count += len(chunk.tokens)
        fill = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [BOS] + chunk.tokens + [EOS] * fill + [EOS]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * fill + [1.0]
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for fragment, weight in fragments:
        if fragment == "BREAK" and weight == -1:
            next_chunk()
            continue
        tokens = tokenize(fragment)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_weights
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()
            embedding, matched = embeddings.find_at(tokens, position) if embeddings else (None, 0)
            if embedding is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            if len(chunk.tokens) + embedding.vectors > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.vectors
            chunk.multipliers += [weight] * embedding.vectors
            used.append(embedding)
            position += matched
    if chunk.tokens or not chunks:
        next_chunk()
    return ChunkedPrompt(chunks, token_count, used)


def count_tokens(text: str, embeddings: EmbeddingLookup | None = None, comma_backtrack: int = 20) -> tuple[int, int]:
    """(tokens used, chunk capacity) as A1111's counter shows it: capacity = ceil(max(used,1)/75)*75."""
    used = chunk_prompt(text, embeddings, comma_backtrack).token_count
    return used, math.ceil(max(used, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


@dataclass
class EncoderSpec:
    """How one text encoder's output is taken (per family, as A1111 takes it)."""

    kind: str              # "clip_l" | "open_clip_h" | "open_clip_g"
    layer: str             # "clip_skip" (SD1), "penultimate_norm" (SD2), "penultimate" (SDXL)
    pad: int               # token used after the first EOS
    pooled: bool = False   # return the projected pooled vector (SDXL bigG)


def encoder_specs(family: str) -> list[EncoderSpec]:
    """The encoders of a family in the order their outputs are concatenated."""
    if family == "sd1":
        return [EncoderSpec("clip_l", "clip_skip", EOS)]
    if family == "sd2":
        return [EncoderSpec("open_clip_h", "penultimate_norm", OPEN_CLIP_PAD)]
    if family == "sdxl":
        return [EncoderSpec("clip_l", "penultimate", EOS), EncoderSpec("open_clip_g", "penultimate", OPEN_CLIP_PAD, True)]
    if family == "sdxl-refiner":
        return [EncoderSpec("open_clip_g", "penultimate", OPEN_CLIP_PAD, True)]
    raise ValueError(f"unknown family {family!r}")


@contextmanager
def _embedding_fixes(model: torch.nn.Module, kind: str, rows: list[list[tuple[int, Embedding]]]) -> Iterator[None]:
    """Put textual-inversion vectors into the token-embedding output (after BOS) for each batch row."""
    if not any(rows):
        yield
        return
    token_embedding = model.get_input_embeddings()

    def replace(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, fixes in enumerate(rows):
            for offset, embedding in fixes:
                vectors = embedding.vectors_for(kind).to(output.device, output.dtype)
                output[row, offset + 1: offset + 1 + vectors.shape[0]] = vectors
        return output

    handle = token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def _encode_chunk_batch(model: torch.nn.Module, spec: EncoderSpec, batch: list[PromptChunk], clip_skip: int,
                        emphasis: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk per batch row through one encoder (on its device) -> (z (B,77,C), pooled (B,P) or None), float32
    on the CPU."""
    tokens = torch.tensor([c.tokens for c in batch], dtype=torch.long)
    if spec.pad != EOS:
        for row in tokens:
            first_eos = int((row == EOS).nonzero()[0])
            row[first_eos + 1:] = spec.pad
    with torch.inference_mode(), _embedding_fixes(model, spec.kind, [c.fixes for c in batch]):
        out = model(input_ids=tokens.to(model.device), output_hidden_states=True)
    final_norm = model.text_model.final_layer_norm if hasattr(model, "text_model") else model.final_layer_norm
    if spec.layer == "clip_skip":
        z = out.last_hidden_state if clip_skip <= 1 else final_norm(out.hidden_states[-clip_skip])
    elif spec.layer == "penultimate_norm":
        z = final_norm(out.hidden_states[-2])
    else:
        z = out.hidden_states[-2]
    z = z.float().cpu()
    if emphasis in ("Original", "No norm"):
        multipliers = torch.tensor([c.multipliers for c in batch], dtype=torch.float32)
        original_mean = z.mean()
        z = z * multipliers.unsqueeze(-1)
        if emphasis == "Original":
            z = z * (original_mean / z.mean())
    pooled = out.text_embeds.float().cpu() if spec.pooled else None
    return z, pooled


@dataclass
class TextConditioning:
    """Encoded texts: cross-attention states (B, 77·chunks, C) and, for SDXL, the pooled vector (B, P)."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None
    embeddings: list[Embedding]


def encode_texts(encoders: dict[str, torch.nn.Module], family: str, texts: Sequence[str],
                 embeddings: EmbeddingLookup | None = None, clip_skip: int = 1, emphasis: str = "Original",
                 comma_backtrack: int = 20, zero_if_empty: bool = False) -> TextConditioning:
    """Encode texts as A1111 does for one call (emphasis means are taken over this whole batch); `encoders` maps
    kind -> module. `zero_if_empty`: SDXL's all-empty negative prompt gives zero embeddings (A1111/sgm)."""
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}")
    prompts = [chunk_prompt(t, embeddings, comma_backtrack, emphasis) for t in texts]
    chunk_count = max(len(p.chunks) for p in prompts)
    empty = chunk_prompt("", None).chunks[0]
    outputs, pooled = [], None
    for spec in encoder_specs(family):
        model = encoders[spec.kind]
        zs = []
        for i in range(chunk_count):
            batch = [p.chunks[i] if i < len(p.chunks) else empty for p in prompts]
            z, chunk_pooled = _encode_chunk_batch(model, spec, batch, clip_skip, emphasis)
            zs.append(z)
            if i == 0 and chunk_pooled is not None:
                pooled = chunk_pooled  # A1111 takes the pooled output of the first chunk
        outputs.append(torch.cat(zs, dim=1))
    crossattn = torch.cat(outputs, dim=-1)
    if zero_if_empty and family.startswith("sdxl") and all(t == "" for t in texts):
        crossattn = torch.zeros_like(crossattn)
        pooled = torch.zeros_like(pooled) if pooled is not None else None
    used = [e for p in prompts for e in p.embeddings]
    return TextConditioning(crossattn, pooled, used)
