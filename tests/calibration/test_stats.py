import pytest
import torch

from calibration.stats import ChannelMeanSquare, InputSecondMoment, symmetric_gram, token_log_frequency


def test_channel_mean_square_accumulates_over_batches():
    stats = ChannelMeanSquare(3)
    first, second = torch.randn(2, 5, 3), torch.randn(4, 3)
    stats.add_batch(first)
    stats.add_batch(second)
    everything = torch.cat([first.reshape(-1, 3), second])
    assert stats.num_tokens == 14
    assert torch.allclose(stats.mean_square, everything.pow(2).mean(dim=0))


def test_token_log_frequency_is_a_smoothed_log_probability():
    table = token_log_frequency(torch.tensor([0, 0, 0, 1]), vocab_size=4)
    assert table.shape == (4,)
    assert torch.allclose(table.exp().sum(), torch.tensor(1.0))
    assert table[0] > table[1] > table[2] == table[3]


def test_held_out_tokens_are_left_out_of_the_counts():
    everything = torch.tensor([0, 0, 1, 2, 2, 2])
    table = token_log_frequency(everything, vocab_size=3, held_out=torch.tensor([2, 2]))
    direct = token_log_frequency(torch.tensor([0, 0, 1, 2]), vocab_size=3)
    assert torch.allclose(table, direct)


def test_first_position_weighting_counts_each_window_start_that_many_times():
    stats = InputSecondMoment(3)
    batch = torch.randn(2, 5, 3)
    stats.add_batch(batch)
    assert stats.num_first == 2
    assert torch.allclose(stats.hessian_with_first_weighted(1.0), stats.hessian)
    # Weight 4: the two first positions appear four times each among 10 + 2 * 3 rows.
    rows = torch.cat([batch.reshape(-1, 3)] + [batch[:, 0]] * 3)
    assert torch.allclose(stats.hessian_with_first_weighted(4.0), rows.t() @ rows / rows.shape[0], atol=1e-6)


def test_flat_inputs_have_no_first_position():
    stats = InputSecondMoment(3)
    stats.add_batch(torch.randn(7, 3))
    assert stats.num_first == 0
    assert torch.allclose(stats.hessian_with_first_weighted(100.0), stats.hessian)


def test_symmetric_gram_equals_the_full_product_at_widths_around_the_block():
    generator = torch.Generator().manual_seed(0)
    for width in (64, 256, 257, 576, 1536):
        rows = torch.randn(300, width, generator=generator)
        gram = symmetric_gram(rows, block=256)
        assert torch.equal(gram, gram.t())
        torch.testing.assert_close(gram, rows.t() @ rows, rtol=1e-5, atol=1e-3)


def test_second_moment_hessian_is_the_mean_outer_product():
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 300, generator=generator) for _ in range(3)]
    moment = InputSecondMoment(300)
    for batch in batches:
        moment.add_batch(batch)
    flat = torch.cat([b.reshape(-1, 300) for b in batches]).double()
    torch.testing.assert_close(moment.hessian.double(), flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)


def test_a_moment_without_first_positions_or_released_says_so():
    inputs = torch.randn(2, 6, 4)
    lean, full = InputSecondMoment(4, first_position=False), InputSecondMoment(4)
    lean.add_batch(inputs)
    full.add_batch(inputs)
    assert lean.sum_outer_first is None
    assert torch.equal(lean.hessian, full.hessian)
    with pytest.raises(RuntimeError, match="without first_position"):
        lean.hessian_with_first_weighted(6)
    full.release()
    assert full.sum_outer is None and full.sum_outer_first is None
    assert torch.allclose(full.mean_square, inputs.reshape(-1, 4).pow(2).mean(dim=0))  # the diagonal stays
    with pytest.raises(RuntimeError, match="released"):
        full.hessian
    with pytest.raises(RuntimeError, match="released"):
        full.add_batch(inputs)
