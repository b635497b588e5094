import torch

from tap_convert.sketch import input_norm_sites
from tap_runtime.router import error_estimate_feature


def test_full_rank_sketch_reproduces_the_summed_output_error():
    generator = torch.Generator().manual_seed(0)
    errors = [torch.randn(24, 16, generator=generator), torch.randn(8, 16, generator=generator)]
    gram = sum(e.t().double() @ e.double() for e in errors)
    values, vectors = torch.linalg.eigh(gram)
    sketch = (vectors * values.clamp_min(0).sqrt()).float()
    x = torch.randn(5, 16, generator=generator)
    exact = sum((x @ e.t()).pow(2).sum(-1) for e in errors)
    assert torch.allclose(error_estimate_feature(x, sketch), torch.log(exact), atol=1e-4)


def test_low_rank_sketch_ranks_tokens_like_the_exact_error():
    generator = torch.Generator().manual_seed(1)
    # An error concentrated in a few input directions, as base-tier errors on outlier channels are.
    basis = torch.randn(4, 64, generator=generator)
    error = torch.randn(32, 4, generator=generator) @ basis * 3 + 0.05 * torch.randn(32, 64, generator=generator)
    values, vectors = torch.linalg.eigh(error.t().double() @ error.double())
    sketch = (vectors[:, -8:] * values[-8:].sqrt()).float()
    x = torch.randn(500, 64, generator=generator)
    exact = (x @ error.t()).pow(2).sum(-1)
    estimate = error_estimate_feature(x, sketch).exp()
    ranks = lambda t: t.argsort().argsort().float()  # noqa: E731
    correlation = torch.corrcoef(torch.stack([ranks(exact), ranks(estimate)]))[0, 1]
    assert correlation > 0.98


class _Site:
    def __init__(self, name, layer_index):
        self.name, self.layer_index = name, layer_index


def test_input_norm_sites_are_those_sharing_the_first_input():
    shared, other = object(), object()
    sites = [_Site("q", 0), _Site("k", 0), _Site("o", 0), _Site("q1", 1)]
    stats = {"q": shared, "k": shared, "o": other, "q1": object()}
    grouped = input_norm_sites(sites, stats)
    assert [s.name for s in grouped[0]] == ["q", "k"] and [s.name for s in grouped[1]] == ["q1"]
