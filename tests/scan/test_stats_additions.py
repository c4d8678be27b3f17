"""The pure functions the scan added to ``qdoctor.stats``, each against a second derivation."""

import pytest
import torch
import torch.nn.functional as F

from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.spec import QuantSpec
from qdoctor.stats.quant_error import (
    act_rel_error,
    gram_sq_norm,
    output_rel_error,
    row_sq_norms,
    rows_quadratic_form,
    sampled_act_rel_error,
    sampled_output_rel_error,
    weighted_gram,
    weighted_norm_ratio,
    weighted_rel_error,
    weight_output_rel_error,
)
from qdoctor.stats.spikes import median_token_absmax, spike_channels, token_absmax_by_position
from qdoctor.stats.weights import input_dim_absmax, median_dim_absmax

G = torch.Generator().manual_seed(0)


def test_unweighted_sampled_errors_equal_the_plain_ones():
    x, w = torch.randn(50, 24, generator=G), torch.randn(16, 24, generator=G)
    for w_spec, a_spec in ((QuantSpec("int8", PerChannel()), None), (None, QuantSpec("int8", PerToken(), True)),
                           (QuantSpec("fp8", PerTensor()), QuantSpec("fp8", PerTensor(), True))):
        assert sampled_output_rel_error(x, w, w_spec, a_spec) == pytest.approx(output_rel_error(x, w, w_spec, a_spec),
                                                                                rel=1e-5)
    spec = QuantSpec("int8", PerTensor(), True)
    assert sampled_act_rel_error(x, spec) == pytest.approx(act_rel_error(x, spec), rel=1e-5)


def test_integer_row_weights_equal_repeating_rows():
    x = torch.randn(10, 8, generator=G)
    ref = x + 0.1 * torch.randn(10, 8, generator=G)
    reps = torch.tensor([1, 3, 1, 2, 5, 1, 1, 4, 1, 2])
    weighted = weighted_rel_error(x, ref, reps.float())
    repeated = weighted_rel_error(x.repeat_interleave(reps, 0), ref.repeat_interleave(reps, 0))
    assert weighted == pytest.approx(repeated, rel=1e-6)
    assert weighted_norm_ratio(torch.zeros(3), torch.zeros(3)) == 0.0


def test_gram_forms_equal_the_direct_sums():
    x, d = torch.randn(40, 12, generator=G), torch.randn(7, 12, generator=G)
    wt = torch.rand(40, generator=G)
    direct = float(((x.double() @ d.double().T) ** 2).sum(dim=1).mul(wt.double()).sum())
    assert gram_sq_norm(d, weighted_gram(x, wt)) == pytest.approx(direct, rel=1e-5)
    torch.testing.assert_close(rows_quadratic_form(x, d.T @ d), row_sq_norms(F.linear(x, d)), rtol=1e-4, atol=1e-4)


def test_spike_helpers():
    ta = torch.tensor([[1.0, 2.0, 3.0, 100.0], [2.0, 2.0, 4.0, 4.0]])
    # per-sample medians (lower median, torch's convention): 2 and 2 → median 2
    assert median_token_absmax(ta) == 2.0
    mx, med = token_absmax_by_position(ta)
    assert mx.tolist() == [2.0, 2.0, 4.0, 100.0] and med.tolist() == [1.0, 2.0, 3.0, 4.0]
    rows = torch.zeros(3, 6)
    rows[0, 4], rows[1, 1], rows[2, 4] = -50.0, 20.0, 7.0
    assert spike_channels(rows, 2) == [(4, 50.0), (1, 20.0)]
    assert spike_channels(torch.zeros(0, 6)) == []


def test_median_dim_absmax():
    w = torch.randn(9, 31, generator=G)
    assert median_dim_absmax(w) == float(input_dim_absmax(w).median())


@pytest.mark.parametrize("gran", [PerChannel(), PerGroup(8), PerTensor()])
def test_weight_output_rel_error_in_row_blocks_equals_the_whole_computation(gran):
    """Blocks of 5 output rows (not dividing 37) give ‖X(Ŵ − W)ᵀ‖/‖XWᵀ‖ of the one-shot form;
    a per-tensor spec (one scale over all of W) takes the one-shot path."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(20, 32, generator=g), torch.randn(37, 32, generator=g)
    w[4, 7] = 40.0  # an outlier: per-channel and per-group errors differ
    spec = QuantSpec("int8", gran)
    assert weight_output_rel_error(x, w, spec, max_elems=5 * 32) == pytest.approx(output_rel_error(x, w, spec), rel=1e-5)
    assert weight_output_rel_error(x, w.bfloat16(), spec, max_elems=5 * 32) == pytest.approx(
        output_rel_error(x, w.bfloat16().float(), spec), rel=1e-5)
