import torch

from calibration.stats import ChannelMeanSquare, token_log_frequency


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
