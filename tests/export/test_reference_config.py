"""Plain W8A8 (INT8 per-channel weights, INT8 dynamic per-token activations) writes the same
``quantization_config`` as llm-compressor, field for field.

``ct_w8a8_reference.json`` is the config llm-compressor 0.14 (compressed-tensors 0.19.0) wrote
for that scheme. Fields allowed to differ, and why:

- ``version``: the compressed-tensors version that wrote the file (0.19.0 there, 0.20.0 here).
- fields serialized as ``null``/``{}`` by 0.19.0 that 0.20.0's ``QuantizationArgs`` serializer
  omits when unset (``actorder``, ``block_structure``, ``scale_dtype``, ``zp_dtype``,
  ``observer_kwargs``, and ``observer`` on the dynamic activations): absent and null parse to
  the same ``QuantizationArgs``, which the second test checks;
- ``moe_sparsity_config: null``: a field compressed-tensors 0.20.0 added (absent in 0.19.0).
"""

import json
from pathlib import Path

import pytest

import qdoctor
from qdoctor.export import export_checkpoint

REFERENCE = json.loads((Path(__file__).parent / "ct_w8a8_reference.json").read_text())
OMITTED_WHEN_UNSET = {"actorder", "block_structure", "scale_dtype", "zp_dtype", "observer_kwargs", "observer"}
NEW_IN_0_20 = {"moe_sparsity_config"}


@pytest.fixture(scope="module")
def written(tiny_llama_dir, tmp_path_factory):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    qdoctor.quantize(model, "w8a8-channel-token", progress=False)
    out = tmp_path_factory.mktemp("w8a8") / "ckpt"
    export_checkpoint(model, tok, out, progress=False)
    return json.loads((out / "config.json").read_text())["quantization_config"]


def _diff(ref, got, path=""):
    """(path, reference value, our value) for every difference."""
    out = []
    if isinstance(ref, dict) and isinstance(got, dict):
        for k in sorted(set(ref) | set(got)):
            p = f"{path}.{k}" if path else k
            if k not in got:
                out.append((p, ref[k], "<absent>"))
            elif k not in ref:
                out.append((p, "<absent>", got[k]))
            else:
                out += _diff(ref[k], got[k], p)
    elif ref != got:
        out.append((path, ref, got))
    return out


def _allowed(path: str, ref, got) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    if path == "version":
        return True
    if leaf in NEW_IN_0_20 and ref == "<absent>" and got is None:
        return True
    return leaf in OMITTED_WHEN_UNSET and got == "<absent>" and ref in (None, {})


def test_field_for_field_against_llm_compressor(written):
    diffs = _diff(REFERENCE, written)
    unexpected = [d for d in diffs if not _allowed(*d)]
    assert unexpected == []
    # and the values that matter are there verbatim
    g = written["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"] and g["format"] == "int-quantized"
    assert g["weights"]["strategy"] == "channel" and g["weights"]["observer"] == "memoryless_minmax"
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"] is True
    assert written["ignore"] == ["lm_head"] and written["quantization_status"] == "compressed"


def test_reference_and_ours_parse_to_the_same_config(written):
    from compressed_tensors.quantization import QuantizationConfig

    ref = QuantizationConfig.model_validate(REFERENCE)
    ours = QuantizationConfig.model_validate(written)
    assert ours.model_dump() == ref.model_dump()
