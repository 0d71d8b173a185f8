"""One continuous-position-bias formula: the model, the CPB maps (`cpb_tables`) and the size-free export
forward all compose the same steps (`attention.log_spaced_coords`, `windows.relative_index`,
`attention.cpb_bias`), so given the window as ints or as tensors (traced shapes) they give the same bits."""

from __future__ import annotations

import pytest
import torch

import swinv2
from randomize import randomize_
from swinv2.model.attention import cpb_bias, cpb_input, log_spaced_coords
from swinv2.model.cpb import cpb_tables
from swinv2.model.transformer import WindowAttention
from swinv2.model.windows import relative_index, relative_position_index
from swinv2.serve import dynamic_forward

# (window, pre-training window): square, rectangular, pre-trained square / rectangular, windows of one
# token per axis (their single offset 0 must stay 0, not 0/0).
CASES = [
    ((4, 4), (0, 0)),
    ((3, 5), (0, 0)),
    ((8, 8), (3, 3)),
    ((3, 5), (6, 3)),
    ((4, 4), (6, 3)),
    ((1, 1), (0, 0)),
    ((1, 3), (0, 0)),
    ((1, 2), (0, 0)),
]


def _tensors(window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(window[0]), torch.tensor(window[1])


@pytest.mark.parametrize("window, pretrained", CASES)
def test_ints_and_tensor_sizes_give_the_same_table_and_index(window, pretrained):
    ints = log_spaced_coords(window, pretrained)
    tensors = log_spaced_coords(_tensors(window), pretrained, square=window[0] == window[1])
    assert ints.dtype == torch.float32 and ints.shape == ((2 * window[0] - 1) * (2 * window[1] - 1), 2)
    assert torch.equal(ints, tensors) and torch.equal(cpb_input(window, pretrained, torch.device("cpu")), ints)
    index = relative_index(*window)
    assert torch.equal(index, relative_index(*_tensors(window)))
    assert torch.equal(relative_position_index(window, torch.device("cpu")), index)
    assert torch.equal(ints[index.diagonal()], torch.zeros(window[0] * window[1], 2))  # a token and itself: 0


def test_the_table_is_the_papers_formula():
    """Offsets normalised by the pre-training window - 1 per axis, to [-8, 8], then sign * log2(1 + |x|) / 3."""
    table = log_spaced_coords((3, 5), (6, 3)).view(5, 9, 2)
    dy, dx = torch.meshgrid(torch.arange(-2.0, 3.0), torch.arange(-4.0, 5.0), indexing="ij")
    for got, offsets, divisor in ((table[..., 0], dy, 5), (table[..., 1], dx, 2)):
        x = offsets / divisor * 8
        torch.testing.assert_close(got, torch.sign(x) * torch.log2(1 + x.abs()) / 3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window, pretrained", CASES)
def test_the_model_the_maps_and_the_export_forward_add_the_same_bias(window, pretrained):
    torch.manual_seed(0)
    attn = randomize_(WindowAttention(8, 2, pretrained_window_size=pretrained, cpb_hidden_dim=32), std=0.5)
    with torch.no_grad():
        model = attn.position_bias(window)  # (nH, N, N)
        exported = dynamic_forward.position_bias(attn, _tensors(window), window[0] == window[1])
        per_offset = cpb_bias(attn.cpb_mlp, log_spaced_coords(window, pretrained))  # ((2h-1)(2w-1), nH)
    N = window[0] * window[1]
    assert model.shape == (2, N, N) and torch.equal(model, exported)
    assert (model > 0).all() and (model < 16).all()
    # the same values per offset, gathered: the sigmoid of a number does not depend on where it sits
    torch.testing.assert_close(model, per_offset.t()[:, relative_index(*window)], rtol=0, atol=1e-6)


def test_cpb_tables_are_the_per_offset_bias_of_every_block():
    model = randomize_(swinv2.create_model("swinv2_micro_window4_32"), std=0.5).eval()
    tables = cpb_tables(model, window=(3, 5))
    blocks = [blk for layer in model.layers for blk in layer.blocks]
    assert len(tables) == len(blocks)
    for table, blk in zip(tables, blocks):
        with torch.no_grad():
            expected = cpb_bias(blk.attn.cpb_mlp, log_spaced_coords((3, 5), blk.attn.pretrained_window_size))
        assert torch.equal(table.bias, expected.T.reshape(-1, 5, 9))
