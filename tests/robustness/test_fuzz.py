"""Fuzzing (issue 18, item 4): the scheme/recipe/granularity/budget parsers and the quantizers
on random input — the only exception that may escape is ``QDoctorError``; ±Inf/NaN are refused.
Seeded (``derandomize``) and bounded so the group stays fast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdoctor.errors import QDoctorError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                               max_size=4),
                           max_leaves=12)
granularity_text = st.sampled_from(["tensor", "channel", "token", "group:128", "group:0", "group:-4", "group:x",
                                    "group:", "group:1.5", "chan", ""]) | st.text(max_size=10)
spec_dicts = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["int8", "fp8", "int4", "", None]) | json_scalars,
    "granularity": granularity_text | json_scalars,
    "dynamic": json_scalars,
    "observer": st.sampled_from(["absmax", "mse", "percentile:99.9", "percentile:0", "percentile:101", "percentile:x",
                                 "median"]) | json_scalars,
    "bogus": json_scalars,
})
layer_dicts = st.fixed_dictionaries({}, optional={
    "weights": spec_dicts | json_values, "activations": spec_dicts | st.none() | json_values,
    "keep": st.sampled_from(["bf16", "fp16", "fp32", "int8", ""]) | json_scalars,
})
scheme_dicts = st.fixed_dictionaries({}, optional={
    "name": json_scalars, "description": json_scalars, "default": layer_dicts | json_values,
    "overrides": st.dictionaries(st.text(max_size=20), layer_dicts, max_size=3) | json_values,
    "ignore": st.lists(st.text(max_size=8), max_size=3) | json_values,
})


def _only_qdoctor_errors(fn, *args):
    try:
        return fn(*args)
    except QDoctorError:
        return None


@FUZZ
@given(scheme_dicts | json_values)
def test_scheme_from_dict(d):
    from qdoctor.quant.spec import Scheme

    s = _only_qdoctor_errors(Scheme.from_dict, d)
    if s is not None:  # whatever parses round-trips
        assert Scheme.from_dict(s.to_dict()).to_dict() == s.to_dict()


calib_dicts = st.fixed_dictionaries({}, optional={
    "n_samples": st.integers(-3, 100) | json_scalars, "seqlen": st.integers(-3, 4096) | json_scalars,
    "source": st.sampled_from(["wikitext2:valid", "wikitext2:test", "valid"]) | json_scalars,
    "seed": st.integers(-5, 2**40) | json_scalars, "batch_size": st.integers(-1, 8) | json_scalars,
    "sample_rows": st.integers(-1, 600) | json_scalars, "holdout_fraction": st.floats() | json_scalars,
})
smooth_dicts = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["smoothquant", "bismooth-max", "bismooth-median", "magic"]) | json_scalars,
    "alpha": st.floats(-1, 2) | st.just("auto") | json_scalars,
    "layers": st.lists(st.text(max_size=8), max_size=2) | json_values,
})
recipe_dicts = st.fixed_dictionaries({"scheme": scheme_dicts}, optional={
    "qdoctor_recipe": st.sampled_from([1, 2, 0, "1"]) | json_scalars, "model": json_scalars,
    "calibration": calib_dicts | json_values, "smoothing": st.lists(smooth_dicts, max_size=2) | json_values,
    "evidence": json_values, "metrics": json_values, "extra": json_scalars,
})


@FUZZ
@given(recipe_dicts | json_values)
def test_recipe_from_dict(d):
    from qdoctor.policy.recipe import Recipe

    r = _only_qdoctor_errors(Recipe.from_dict, d)
    if r is not None:
        assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_scheme_and_recipe_files_of_random_bytes(tmp_path_factory, data):
    from qdoctor.policy.recipe import load_recipe
    from qdoctor.quant.schemefile import load_scheme_file

    d = tmp_path_factory.getbasetemp()
    for name in ("s.yaml", "s.json"):
        (d / name).write_bytes(data)
        _only_qdoctor_errors(load_scheme_file, str(d / name))
    (d / "r.yaml").write_bytes(data)
    _only_qdoctor_errors(load_recipe, str(d / "r.yaml"))


@FUZZ
@given(st.text(max_size=16))
def test_granularity_and_budget_parsers(text):
    from qdoctor.cli.fix_cmd import parse_percent, parse_points
    from qdoctor.policy.metric import parse_metric
    from qdoctor.quant.granularity import granularity_from_str

    _only_qdoctor_errors(granularity_from_str, text)
    _only_qdoctor_errors(parse_metric, text)
    for parse in (parse_percent, parse_points):
        v = _only_qdoctor_errors(parse, text)
        assert v is None or (math.isfinite(v) and v >= 0), (text, v)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "nan%", "Infinity%", "1e999"])
def test_budget_refuses_non_finite(text):
    from qdoctor.cli.fix_cmd import parse_percent, parse_points

    with pytest.raises(QDoctorError):
        parse_percent(text)
    with pytest.raises(QDoctorError):
        parse_points(text.rstrip("%"))


# --- quantizers ---------------------------------------------------------------------------------

SPECIALS = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.17e-38, 3e38, -3e38, 65504.0, 1.0, -1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def tensors(draw, allow_nonfinite: bool):
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 6)) for _ in range(rank - 1)] + [draw(st.sampled_from([1, 2, 3, 4, 8, 12, 16]))]
    n = math.prod(shape)
    pool = st.sampled_from(SPECIALS) | st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
    if allow_nonfinite:
        pool = pool | st.sampled_from([math.inf, -math.inf, math.nan])
    values = draw(st.lists(pool, min_size=n, max_size=n))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


specs = st.builds(lambda dt, g: (dt, g), st.sampled_from(["int8", "fp8"]),
                  st.sampled_from(["tensor", "channel", "token", "group:2", "group:4", "group:8", "group:3"]))


def _spec(dt, g, dynamic=True):
    from qdoctor.quant.granularity import PerChannel, granularity_from_str
    from qdoctor.quant.spec import QuantSpec

    gran = granularity_from_str(g)
    return QuantSpec(dtype=dt, granularity=gran, dynamic=dynamic and not isinstance(gran, PerChannel))


@FUZZ
@given(tensors(allow_nonfinite=True), specs)
def test_quantizers_on_random_tensors(x, spec_args):
    from qdoctor.quant.fake import fake_quantize, quantize

    spec = _spec(*spec_args)
    finite = bool(torch.isfinite(x).all())
    for fn in (fake_quantize, quantize):
        try:
            out = fn(x, spec)
        except QDoctorError as e:
            assert not finite or "does not divide" in str(e), (e, x)
            continue
        assert finite, "a tensor with Inf/NaN was quantized"
        xhat = out if fn is fake_quantize else None
        if xhat is None:
            codes, scale = out
            assert codes.shape == x.shape and bool(torch.isfinite(scale).all())
            continue
        assert xhat.shape == x.shape and bool(torch.isfinite(xhat).all()), (x, xhat)
        # The quantization error is bounded by the largest magnitude (nothing explodes).
        assert float((xhat - x.double()).abs().max()) <= float(x.double().abs().max()) * 1.01 + 1e-30


@FUZZ
@given(tensors(allow_nonfinite=False), st.sampled_from(["tensor", "channel", "group:4"]))
def test_int8_error_bound(x, g):
    """|x − x̂| ≤ s/2 per element (plus float rounding) for INT8 with the spec's own scale."""
    from qdoctor.quant.fake import compute_scale, fake_quantize

    assume(bool(torch.isfinite(x).all()))  # (3e38 overflows fp16/bf16)
    spec = _spec("int8", g)
    try:
        xhat = fake_quantize(x, spec)
        s = compute_scale(x, spec)
    except QDoctorError as e:
        assert "does not divide" in str(e)
        return
    xf = x.float()
    if g.startswith("group"):
        from qdoctor.quant.scales import group_view

        err = (group_view(xhat, 4) - group_view(xf, 4)).abs()
        bound = s / 2
    else:
        err, bound = (xhat - xf).abs(), s / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-37).all())
