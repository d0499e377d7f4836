"""Conditioning as A1111 computes it, checked against direct computations on a tiny real-layout model."""
from __future__ import annotations

import pytest
import torch

from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.embeddings import Embedding
from sdstudio.prompt.conditioning import (BOS, CHUNK_LENGTH, EOS, EmbeddingLookup, chunk_prompt, count_tokens,
                                          encode_texts, tokenize)


def encoders(model):
    return {e.kind: e.model for e in model.text_encoders}


def direct_clip(model, ids: list[int], weights: list[float]) -> torch.Tensor:
    """Reference: one 77-token chunk through CLIP-L, last hidden state, weights applied, mean restored."""
    tokens = [BOS] + ids + [EOS] * (CHUNK_LENGTH + 1 - len(ids))
    mults = torch.tensor([1.0] + weights + [1.0] * (CHUNK_LENGTH + 1 - len(ids)))
    with torch.no_grad():
        z = model.text_encoders[0].model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    weighted = z * mults[:, None]
    return weighted * (z.mean() / weighted.mean())


def test_real_bpe_tokens():
    assert tokenize("a photo of a cat, masterpiece") == [320, 1125, 539, 320, 2368, 267, 12066]


def test_weighted_prompt_equals_direct_computation(sd1_model):
    cond = encode_texts(encoders(sd1_model), "sd1", ["a (red:1.5) cat"]).crossattn
    ids = tokenize("a ") + tokenize("red") + tokenize(" cat")
    expected = direct_clip(sd1_model, ids, [1.0, 1.5, 1.0])
    assert cond.shape == (1, 77, 64)
    assert torch.allclose(cond[0], expected, atol=1e-6)


def test_no_norm_and_ignore_emphasis(sd1_model):
    plain = encode_texts(encoders(sd1_model), "sd1", ["a red cat"]).crossattn
    ignored = encode_texts(encoders(sd1_model), "sd1", ["a (red:1.5) cat"], emphasis="Ignore").crossattn
    assert torch.equal(plain, ignored)
    no_norm = encode_texts(encoders(sd1_model), "sd1", ["a (red:1.5) cat"], emphasis="No norm").crossattn
    assert torch.allclose(no_norm[0, 2], plain[0, 2] * 1.5, atol=1e-6)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(sd1_model):
    cond = encode_texts(encoders(sd1_model), "sd1", ["a cat"], clip_skip=2).crossattn
    model = sd1_model.text_encoders[0].model
    tokens = [BOS] + tokenize("a cat") + [EOS] * 74
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        expected = model.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(cond, expected, atol=1e-6)


def test_chunks_break_and_comma_backtrack():
    long = ", ".join(["red cat"] * 40)   # 40*2 words + 39 commas = 119 tokens
    chunked = chunk_prompt(long)
    assert chunked.token_count == 119 and len(chunked.chunks) == 2
    first = chunked.chunks[0].tokens
    assert len(first) == 77 and first[0] == BOS and first[-1] == EOS
    # backtrack: the first chunk ends right after a comma, padded with EOS
    body = first[1:76]
    last_comma = max(i for i, t in enumerate(body) if t == 267)
    assert all(t == EOS for t in body[last_comma + 1:]) and last_comma >= 75 - 20
    assert chunk_prompt(long, comma_backtrack=0).chunks[0].tokens[1:76] == tokenize(long)[:75]
    broken = chunk_prompt("a cat BREAK a dog")
    assert len(broken.chunks) == 2 and broken.chunks[1].tokens[1:3] == tokenize("a dog")


def test_thousands_of_tokens_are_chunked(sd1_model):
    text = "cat " * 3000
    used, capacity = count_tokens(text)
    assert used == 3000 and capacity == 3000
    cond = encode_texts(encoders(sd1_model), "sd1", [text[:600]]).crossattn
    assert cond.shape[1] == 77 * 2


def test_token_counter_counts_embedding_vectors():
    emb = Embedding("badhand", None, 5, 64, {"": torch.zeros(5, 64)})
    assert count_tokens("a cat, badhand") == (5, 75)
    assert count_tokens("a cat, badhand", EmbeddingLookup([emb])) == (8, 75)
    assert count_tokens("x " * 74 + "badhand", EmbeddingLookup([emb])) == (79, 150)
    assert count_tokens("") == (0, 75)


def test_sd2_pads_with_zero_and_uses_penultimate_layer_with_final_norm(synth_file):
    model = load_checkpoint(synth_file("sd2", "pruned"))
    cond = encode_texts(encoders(model), "sd2", ["a cat"]).crossattn
    text_model = model.text_encoders[0].model
    tokens = [BOS] + tokenize("a cat") + [EOS] + [0] * 73
    with torch.no_grad():
        out = text_model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        expected = text_model.text_model.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(cond, expected, atol=1e-6)


def test_sdxl_concatenates_both_encoders_and_pools_the_first_chunk(synth_file):
    model = load_checkpoint(synth_file("sdxl", "pruned"))
    text = "a cat " * 50  # two chunks
    result = encode_texts(encoders(model), "sdxl", [text])
    assert result.crossattn.shape == (1, 154, 128) and result.pooled.shape == (1, 64)
    first_only = encode_texts(encoders(model), "sdxl", ["a cat " * 37 + "a"])
    assert torch.allclose(result.pooled, first_only.pooled, atol=1e-6)
    empty = encode_texts(encoders(model), "sdxl", [""], zero_if_empty=True)
    assert not empty.crossattn.any() and not empty.pooled.any()


def test_embedding_fixes_sit_at_the_name_position():
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    emb = Embedding("easynegative", None, 3, 64, {"": vectors})
    chunked = chunk_prompt("ugly, EasyNegative, (blurry:1.2)", EmbeddingLookup([emb]))
    offset = len(tokenize("ugly, "))
    chunk = chunked.chunks[0]
    assert chunk.fixes == [(offset, emb)] and chunked.embeddings == [emb]
    assert chunk.tokens[1 + offset:1 + offset + 3] == [0, 0, 0]
    assert chunk.multipliers[1 + offset:1 + offset + 3] == [1.0, 1.0, 1.0]
    assert chunked.token_count == offset + 3 + len(tokenize(", blurry"))


def test_longest_embedding_name_wins():
    short = Embedding("bad", None, 1, 64, {"": torch.zeros(1, 64)})
    long = Embedding("bad hands", None, 2, 64, {"": torch.ones(2, 64)})
    chunk = chunk_prompt("bad hands", EmbeddingLookup([short, long])).chunks[0]
    assert [e.name for _, e in chunk.fixes] == ["bad hands"]


@pytest.mark.parametrize("negative", [False, True])
def test_embedding_changes_exactly_its_positions(sd1_model, negative):
    from sdstudio import pipeline

    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    emb = Embedding("mystyle", None, 2, 64, {"": vectors})
    model = sd1_model.text_encoders[0].model
    captured = []
    layer = model.encoder.layers[0]
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    request = pipeline.GenerationRequest()
    try:
        pipeline.PromptEncoder(sd1_model, request, [emb]).schedule("a (mystyle:1.1) cat", negative, {})
        pipeline.PromptEncoder(sd1_model, request, None).schedule("a (mystyle:1.1) cat", negative, {})
    finally:
        handle.remove()
    with_emb, without = captured[0][0], captured[1][0]
    a = len(tokenize("a "))
    position_embedding = model.embeddings.position_embedding.weight
    assert torch.allclose(with_emb[1 + a:1 + a + 2], vectors + position_embedding[1 + a:1 + a + 2], atol=1e-6)
    assert torch.equal(with_emb[:1 + a], without[:1 + a])


def test_embedding_inside_emphasis_and_prompt_editing():
    emb = Embedding("mystyle", None, 2, 64, {"": torch.zeros(2, 64)})
    lookup = EmbeddingLookup([emb])
    weighted = chunk_prompt("a (mystyle:1.3) cat", lookup).chunks[0]
    offset = len(tokenize("a "))
    assert weighted.fixes == [(offset, emb)]
    assert weighted.multipliers[1 + offset:1 + offset + 2] == [1.3, 1.3]
    from sdstudio.prompt.parser import prompt_schedule

    texts = [text for _, text in prompt_schedule("a [dog:mystyle:0.5] cat", 10)]
    found = [[e.name for _, e in chunk_prompt(t, lookup).chunks[0].fixes] for t in texts]
    assert found == [[], ["mystyle"]]
