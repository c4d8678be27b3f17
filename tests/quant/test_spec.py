import json

import pytest

from qdoctor.errors import QDoctorError
from qdoctor.quant import NAMED_SCHEMES, LayerScheme, PerChannel, PerTensor, PerToken, QuantSpec, Scheme
from qdoctor.quant.schemefile import load_scheme_file


@pytest.mark.parametrize("name", list(NAMED_SCHEMES))
def test_named_schemes_round_trip_json(name):
    s = NAMED_SCHEMES[name]
    again = Scheme.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s


def test_override_precedence_last_match_wins_and_ignore():
    base = NAMED_SCHEMES["w8a8-channel-tensor-static"]
    keep = LayerScheme(keep="bf16")
    per_token = LayerScheme(QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken(), dynamic=True))
    s = base.with_overrides({"*.down_proj": per_token, "model.layers.11.*": keep})
    assert s.resolve("model.layers.3.mlp.down_proj") is per_token
    assert s.resolve("model.layers.11.mlp.down_proj") is keep
    assert s.resolve("model.layers.3.self_attn.q_proj") is base.default
    assert s.resolve("lm_head") is None


@pytest.mark.parametrize("bad", [
    dict(weights=QuantSpec("int8", PerToken())),
    dict(weights=QuantSpec("int8", PerChannel()), activations=QuantSpec("int8", PerChannel(), dynamic=True)),
    dict(weights=QuantSpec("int8", PerChannel()), activations=QuantSpec("int8", PerToken(), dynamic=False)),
    dict(weights=QuantSpec("int8", PerChannel()), activations=QuantSpec("fp8", PerTensor(), dynamic=True)),
    dict(keep="int4"),
    dict(),
])
def test_invalid_layer_schemes_are_rejected(bad):
    with pytest.raises(QDoctorError):
        LayerScheme(**bad)


def test_bad_dicts_give_clear_errors():
    with pytest.raises(QDoctorError, match="unknown key"):
        Scheme.from_dict({"default": {"weights": {"dtype": "int8", "granularty": "channel"}}})
    with pytest.raises(QDoctorError, match="granularity"):
        QuantSpec.from_dict({"granularity": "row"})
    with pytest.raises(QDoctorError, match="observer"):
        QuantSpec(observer="minmax")
    with pytest.raises(QDoctorError, match="percentile"):
        QuantSpec(observer="percentile:150")


def test_scheme_file_yaml_and_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: mine\ndefault:\n  weights: {dtype: int8, granularity: 'group:32'}\n"
                 "  activations: {dtype: int8, granularity: token, dynamic: true}\n"
                 "overrides:\n  '*.down_proj': {keep: bf16}\n")
    s = load_scheme_file(str(p))
    assert s.name == "mine" and s.resolve("a.down_proj").keep == "bf16"
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(QDoctorError, match="not valid JSON"):
        load_scheme_file(str(bad))
    with pytest.raises(QDoctorError, match="no such"):
        load_scheme_file(str(tmp_path / "missing.json"))
