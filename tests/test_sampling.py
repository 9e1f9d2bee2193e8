"""RowSampler (engine/sampling.py) draws from the distribution its settings
leave, without sorting the vocabulary: the distribution equals the one the
sort-based code computed (temperature, top_k, min_p, top_p, in that order), a
draw follows it, and a seed gives the same tokens."""
import pytest
import torch

from llmhost.engine import sampling
from llmhost.engine.sampling import RowSampler, SamplingParams

VOCAB = 49152   # SmolLM2's: large enough for the flat path and torch.topk's


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the sampler drew from before (torch.sort and multinomial),
    normalized, over the vocabulary."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        ranked, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(ranked, dim=-1) - ranked > p.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return probs / probs.sum()


def spread(probs: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """distribution()'s answer over the vocabulary, normalized."""
    full = probs if ids is None else torch.zeros(VOCAB).index_put((ids,), probs)
    return full / full.sum()


def logits_of(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = {"peaked": 12.0, "flat": 2.0, "model-like": 5.0}[kind]
    return torch.randn(VOCAB, generator=g) * scale


@pytest.mark.parametrize("kind", ["peaked", "flat", "model-like"])
@pytest.mark.parametrize("settings", [
    {"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.5},
    {"temperature": 1.3, "top_p": 0.99}, {"temperature": 1.0, "top_p": 0.0},
    {"temperature": 0.8, "top_k": 40}, {"temperature": 0.8, "top_k": 40, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.05}, {"temperature": 1.0, "min_p": 0.3, "top_p": 0.5},
    {"temperature": 0.9, "top_k": 500, "min_p": 0.01, "top_p": 0.95},
])
def test_distribution_is_the_sorted_codes(kind, settings):
    params = SamplingParams(max_tokens=1, **settings)
    for seed in range(3):
        logits = logits_of(kind, seed)
        want = reference(logits, params)
        got = spread(*RowSampler(params, [1], VOCAB, 0).distribution(logits))
        assert torch.equal(got > 0, want > 0), (int((got > 0).sum()), int((want > 0).sum()))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_the_flat_path_and_ties_keep_as_many_as_top_p_says(monkeypatch):
    """Equal logits: top_p 0.5 of 1,000 equal tokens keeps the 500 whose others
    above add up to less than 0.5 (the 501st's add up to 0.5 exactly: kept or
    not as the float sums round) on the flat path (the whole vocabulary sorted);
    with top_k 999, the 500 of probability 1/999 as the sorted code keeps them."""
    monkeypatch.setattr(sampling, "NUCLEUS_FIRST", 64)
    logits = torch.zeros(1000)
    probs, ids = RowSampler(SamplingParams(max_tokens=1, top_p=0.5), [1], 1000, 0).distribution(logits)
    assert ids is None and int((probs > 0).sum()) in (500, 501)
    params = SamplingParams(max_tokens=1, top_p=0.5, top_k=999)
    probs, ids = RowSampler(params, [1], 1000, 0).distribution(logits)
    assert len(ids) == len(set(ids.tolist())) == 500 == int((reference(logits, params) > 0).sum())


def test_draws_follow_the_distribution():
    """20,000 draws from five tokens (one with no chance): each frequency within
    five standard deviations of its probability (a fixed seed: no flakiness),
    the zero one never drawn."""
    probs = torch.tensor([0.5, 0.25, 0.0, 0.15, 0.1])
    g = torch.Generator().manual_seed(7)
    n = 20000
    counts = torch.bincount(torch.tensor([sampling._draw(probs * 3, None, g) for _ in range(n)]),
                            minlength=5)
    assert counts[2] == 0
    for i in (0, 1, 3, 4):
        p = float(probs[i])
        assert abs(int(counts[i]) - n * p) < 5 * (n * p * (1 - p)) ** 0.5, (i, counts.tolist())
    ids = torch.tensor([40, 41, 42, 43, 44])
    assert sampling._draw(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), ids, g) == 42


def test_a_seed_gives_the_same_tokens_and_bad_logits_fail_the_row():
    logits = logits_of("model-like", 0)
    params = SamplingParams(max_tokens=1, temperature=0.9, top_p=0.95, seed=1234)
    first = [RowSampler(params, [1], VOCAB, 0).choose(logits) for _ in range(2)]
    a, b = RowSampler(params, [1], VOCAB, 0), RowSampler(params, [1], VOCAB, 0)
    assert [a.choose(logits) for _ in range(20)] == [b.choose(logits) for _ in range(20)]
    assert first[0] == first[1]
    other = RowSampler(params, [1], VOCAB, 1)   # the next choice of the same request
    assert [other.choose(logits) for _ in range(20)] != [RowSampler(params, [1], VOCAB, 0).choose(logits)
                                                         for _ in range(20)]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            RowSampler(params, [1], VOCAB, 0).choose(torch.full((VOCAB,), bad))
