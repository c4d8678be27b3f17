"""Round trip on the real SmolLM2-135M: export a mixed plan, load it with transformers, compare.

Finding (transformers 5.23 + compressed-tensors 0.20, CPU): ``from_pretrained`` of a
compressed-tensors checkpoint does quantize activations in the forward pass. Each quantized
``nn.Linear`` gets compressed-tensors' wrapped forward: the weights are decompressed once
(codes × scales = qdoctor's ŵ exactly) and the layer input is fake-quantized on every call —
dynamic scales computed from the live tensor, static ones read from ``input_scale``. Its
dynamic INT8 convention is s = absmax / 127.5 with codes in [−128, 127] (vLLM's kernels and
qdoctor use absmax / 127, codes in [−127, 127]), and kept layers run in the checkpoint dtype
(fp32 here) without qdoctor's bf16/fp16 rounding of their inputs and outputs. So:

- against ``loader_semantics`` (qdoctor's layers with compressed-tensors' rules, see
  ct_reference.py) the loaded model matches to fp32 rounding (measured: 0.0 max-abs);
- against qdoctor's own simulation it differs by a different rounding of the same plan
  (measured: logits max-abs 7.2 on a logit scale of 39; PPL 19.596 vs 19.550, +0.24%, on
  2 × 2048 tokens);
- against the weight-only simulation it differs as much (max-abs 6.1): activations are
  quantized, not just the weights decompressed. Load time 2.0 s (2 busy CPU cores).

The stored codes, scales, static input scales and kept weights equal qdoctor's bit for bit.
"""

import time

import pytest
import torch

import qdoctor
from export.ct_reference import assert_stored_as_qdoctor, loader_semantics, read_tensors, weights_only
from qdoctor.export import export_checkpoint
from qdoctor.quant.spec import Scheme

W = lambda d, g: {"dtype": d, "granularity": g}  # noqa: E731
DYN = lambda d: {"dtype": d, "granularity": "token", "dynamic": True}  # noqa: E731
STAT = lambda d: {"dtype": d, "granularity": "tensor", "dynamic": False}  # noqa: E731

# SmolLM2: hidden 576 (q/k/v/o, gate/up inputs), intermediate 1536 (down_proj input).
MIXED = Scheme.from_dict({"name": "mixed", "default": {"weights": W("int8", "channel"), "activations": DYN("int8")},
                          "overrides": {
                              "model.layers.[0-4].self_attn.[qkv]_proj": {"weights": W("int8", "group:64"),
                                                                          "activations": DYN("int8")},
                              "model.layers.[0-4].mlp.gate_proj": {"weights": W("int8", "group:96"),
                                                                   "activations": DYN("int8")},
                              "model.layers.[0-4].mlp.up_proj": {"weights": W("int8", "group:96"),
                                                                 "activations": DYN("int8")},
                              "model.layers.[0-4].mlp.down_proj": {"weights": W("int8", "group:128"),
                                                                   "activations": DYN("int8")},
                              "model.layers.1[0-4].*": {"weights": W("fp8", "channel"), "activations": DYN("fp8")},
                              "model.layers.15.*": {"weights": W("fp8", "tensor"), "activations": STAT("fp8")},
                              "model.layers.16.mlp.*": {"weights": W("int8", "channel"), "activations": None},
                              "model.layers.2[0-4].*": {"weights": W("int8", "channel"), "activations": STAT("int8")},
                              "model.layers.11.mlp.down_proj": {"keep": "bf16"},
                              "model.layers.28.mlp.down_proj": {"keep": "bf16"},
                              "model.layers.29.mlp.down_proj": {"keep": "fp16"},
                          }})


@pytest.mark.slow
def test_smollm2_mixed_plan_round_trip(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smollm2
    stats = qdoctor.calibrate(model, tok, qdoctor.CalibrationConfig(n_samples=8, seqlen=256))
    res = qdoctor.quantize(model, MIXED, calibration=stats, progress=False)
    try:
        assert res.counts()["keep bf16"] == 2 and res.counts()["int8 W:group:128 A:token-dynamic"] == 5
        sim_ppl = qdoctor.perplexity(model, tok, limit=2, progress=False)
        out = tmp_path / "smollm2-mixed"
        report = export_checkpoint(model, tok, out, progress=False,
                                   card={"ppl": {"qdoctor simulation": sim_ppl.ppl, "windows": 2, "seqlen": 2048}})
        assert report.format == "mixed-precision" and len(report.groups) == 8
        assert {g["format"] for g in report.groups} == {"int-quantized", "float-quantized", "pack-quantized"}
        assert report.weights_bytes < 0.45 * report.fp32_bytes
        assert any("not per-group" in v for v in report.vllm_issues)
        assert assert_stored_as_qdoctor(model, read_tensors(out)) == 207

        t0 = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(out)
        load_s = time.perf_counter() - t0
        text = "The quick brown fox jumps over the lazy dog; Ünïcödé 1234."
        assert AutoTokenizer.from_pretrained(out)(text).input_ids == tok(text).input_ids

        ids = tok("\n\n".join(["Paris is the capital of France."] * 60), return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            got = loaded(ids).logits
            sim = model(ids).logits
            with loader_semantics(model):
                ct = model(ids).logits
            with weights_only(model):
                wo = model(ids).logits
        d_ct, d_sim, d_wo = ((got - x).abs().max().item() for x in (ct, sim, wo))
        print(f"\nload {load_s:.1f}s · logits max-abs: vs loader semantics {d_ct:.2e}, vs qdoctor {d_sim:.3f}, "
              f"vs weight-only {d_wo:.3f} (logit scale {got.abs().max().item():.1f})")
        assert d_ct <= 1e-3  # fp32 rounding only (measured 0.0)
        assert d_wo > 100 * max(d_ct, 1e-3)  # activations are quantized by the loader

        loaded_ppl = qdoctor.perplexity(loaded, tok, limit=2, progress=False).ppl
        with loader_semantics(model):
            ct_ppl = qdoctor.perplexity(model, tok, limit=2, progress=False).ppl
        print(f"PPL (2 × 2048): loaded {loaded_ppl:.4f} · loader semantics {ct_ppl:.4f} · qdoctor {sim_ppl.ppl:.4f}")
        assert abs(loaded_ppl / ct_ppl - 1) <= 1e-3  # equal within 0.1% (measured 0.0)
        # vs qdoctor's own convention: a different rounding of the same plan (measured +0.16%).
        assert abs(loaded_ppl / sim_ppl.ppl - 1) <= 0.01
    finally:
        qdoctor.restore(model)
