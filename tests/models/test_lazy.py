"""Lazy (block-streamed) models give the numbers of the same model loaded whole."""

import json

import pytest
import torch

from qdoctor.calib.collect import collect_linear_stats
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity
from qdoctor.models.lazy import RandomSource, SafetensorsSource, is_lazy, load_lazy
from qdoctor.models.registry import block_linear_names, get_blocks
from qdoctor.models.streaming import stream_blocks
from tests.helpers import cli_reports_whole_and_streamed, save_tiny, tiny_config, tiny_model, tiny_tokenizer


@pytest.fixture(params=["llama", "qwen2", "gemma3_text"])
def saved(request, tmp_path):
    family = request.param
    save_tiny(family, tmp_path / family)
    return family, tmp_path / family


def _windows(n=3, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n, length), generator=g)


def test_lazy_blocks_stay_on_meta_and_perplexity_matches(saved):
    family, path = saved
    eager = tiny_model(family).eval()
    lazy = load_lazy(path, dtype=torch.float32, device="cpu")
    assert is_lazy(lazy) and not is_lazy(eager)
    assert all(p.is_meta for b in get_blocks(lazy) for p in b.parameters())
    w = _windows()
    a = perplexity(eager, None, windows=w, progress=False)
    b = perplexity(lazy, None, windows=w, progress=False)
    assert b.n_tokens == a.n_tokens
    assert b.nll == pytest.approx(a.nll, rel=1e-5)
    # every block was read once and dropped again
    assert lazy.qdoctor_lazy.loads == len(get_blocks(lazy))
    assert all(p.is_meta for blk in get_blocks(lazy) for p in blk.parameters())


def test_lazy_calibration_statistics_match(saved):
    family, path = saved
    eager = tiny_model(family).eval()
    lazy = load_lazy(path, dtype=torch.float32, device="cpu")
    names = block_linear_names(eager)
    w = _windows(4, 32, seed=1)
    s_e = collect_linear_stats(eager, w, names, batch_size=2)
    s_l = collect_linear_stats(lazy, w, names, batch_size=2)
    for n in names:
        torch.testing.assert_close(s_l[n].channel_absmax, s_e[n].channel_absmax, rtol=1e-5, atol=1e-6)


def test_lazy_scan_matches_eager(tmp_path):
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.scan import ScanConfig, scan

    save_tiny("llama", tmp_path / "m")
    eager = tiny_model("llama").eval()
    lazy = load_lazy(tmp_path / "m", dtype=torch.float32, device="cpu")
    tok = tiny_tokenizer()
    cfg = ScanConfig(calibration=CalibrationConfig(n_samples=4, seqlen=32), progress=False)
    r_e, r_l = scan(eager, tok, cfg), scan(lazy, tok, cfg)
    assert [f.name for f in r_l.layers] == [f.name for f in r_e.layers]
    for fe, fl in zip(r_e.layers, r_l.layers):
        assert fl.verdict == fe.verdict
        assert fl.weight.max_abs == pytest.approx(fe.weight.max_abs, rel=1e-6)
        assert fl.activation.absmax == pytest.approx(fe.activation.absmax, rel=1e-5)
        for k, v in fe.errors.items():
            assert fl.errors[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k


def test_sharded_source_reads_only_requested_tensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    d = tmp_path / "sharded"
    d.mkdir()
    model.config.save_pretrained(d)
    blocks0 = {k: v for k, v in sd.items() if ".layers.0." in k}
    rest = {k: v for k, v in sd.items() if k not in blocks0}
    save_file(blocks0, str(d / "model-00001-of-00002.safetensors"))
    save_file(rest, str(d / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in blocks0},
                                             **{k: "model-00002-of-00002.safetensors" for k in rest}}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    src = SafetensorsSource(d)
    name = "model.layers.0.mlp.down_proj.weight"
    t = src.tensors([name], "cpu", torch.float32)[name]
    torch.testing.assert_close(t, sd[name])
    lazy = load_lazy(src, dtype=torch.float32, device="cpu")
    w = _windows(2, 24)
    assert perplexity(lazy, None, windows=w, progress=False).nll == pytest.approx(
        perplexity(model, None, windows=w, progress=False).nll, rel=1e-5)
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(QDoctorError, match="missing"):
        SafetensorsSource(d)


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    d = tmp_path / "broken"
    d.mkdir()
    model.config.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(sd, str(d / "model.safetensors"))
    lazy = load_lazy(d, dtype=torch.float32, device="cpu")
    with pytest.raises(QDoctorError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        stream_blocks(lazy, _windows(1, 8), lambda i, b, x: None, progress=False)
    # the failing block was dropped again: nothing half-loaded stays behind
    assert all(p.is_meta for blk in get_blocks(lazy) for p in blk.parameters())


def test_random_source_is_deterministic_and_plants_outliers():
    cfg = tiny_config("llama")
    src = RandomSource(cfg, seed=3, outlier_blocks=1, outlier_dims=2, outlier_rows=4, outlier_value=90.0)
    lazy = load_lazy(src, dtype=torch.float32, device="cpu")
    seen = {}

    def grab(i, block, inputs):
        seen[i] = {n: p.detach().clone() for n, p in block.named_parameters()}

    stream_blocks(lazy, _windows(1, 8), grab, progress=False)
    again = RandomSource(cfg, seed=3, outlier_blocks=1, outlier_dims=2, outlier_rows=4, outlier_value=90.0)
    shape = seen[0]["self_attn.q_proj.weight"].shape
    torch.testing.assert_close(again.tensor("model.layers.0.self_attn.q_proj.weight", tuple(shape), "cpu",
                                            torch.float32), seen[0]["self_attn.q_proj.weight"])
    q0, q1 = seen[0]["self_attn.q_proj.weight"], seen[1]["self_attn.q_proj.weight"]
    assert (q0.abs() == 90.0).sum() == 4 * 2 and q1.abs().max() < 1.0
    # the planted dims are shared by all consumers of the block's input norm
    dims_q = set(torch.nonzero(q0.abs() == 90.0)[:, 1].tolist())
    dims_k = set(torch.nonzero(seen[0]["self_attn.k_proj.weight"].abs() == 90.0)[:, 1].tolist())
    assert dims_q == dims_k and len(dims_q) == 2
    assert torch.all(seen[0]["input_layernorm.weight"] == 1.0)


def test_scan_cli_stream_matches_whole_model(tmp_path, capsys):
    from qdoctor.cli import main

    save_tiny("llama", tmp_path / "m")
    whole, streamed = cli_reports_whole_and_streamed(
        tmp_path, ["scan", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32", "--calib-samples", "2",
                   "--calib-seqlen", "32", "--quiet"])
    a, b = whole["layers"], streamed["layers"]
    assert [x["name"] for x in a] == [x["name"] for x in b]
    assert [x["verdict"] for x in a] == [x["verdict"] for x in b]
    capsys.readouterr()
    # per-projection sensitivity goes through the block pipeline too: the same numbers streamed
    whole, streamed = cli_reports_whole_and_streamed(
        tmp_path, ["scan", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32", "--calib-samples", "2",
                   "--calib-seqlen", "32", "--quiet", "--sensitivity", "projection", "--sensitivity-windows", "1",
                   "--sensitivity-seqlen", "32"])
    ra, rb = whole["sensitivity"]["results"], streamed["sensitivity"]["results"]
    assert sorted(ra) == sorted(rb) and len(ra) == 7
    for k in ra:
        assert rb[k]["ppl"] == pytest.approx(ra[k]["ppl"], rel=1e-4), k
    capsys.readouterr()
    assert main(["scan", "--model", "smollm2-135m", "--stream", "--quiet"]) == 2
    assert "--stream reads a local Hugging Face directory" in capsys.readouterr().err


def test_streamed_perplexity_head_chunks_do_not_change_the_nll(saved, monkeypatch):
    """The LM head runs over a few tokens at a time (fp32 logits of a 128k vocabulary are big);
    chunks of 7 tokens — not dividing the window — give the NLL of the whole-model pass."""
    import qdoctor.eval.perplexity as P

    family, path = saved
    w = _windows()
    whole = perplexity(tiny_model(family).eval(), None, windows=w, progress=False)
    lazy = load_lazy(path, dtype=torch.float32, device="cpu")
    vocab = lazy.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(P, "_HEAD_CHUNK_ELEMS", 7 * vocab)
    chunked = perplexity(lazy, None, windows=w, progress=False)
    assert chunked.n_tokens == whole.n_tokens
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-5)


def test_eval_cli_stream_matches_whole_model(tmp_path, capsys):
    """``qdoctor eval --stream``: every row (full precision, a named static scheme, a recipe with
    SmoothQuant and a kept layer) has the perplexity and layer counts of the whole-model run."""
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.cli import main
    from qdoctor.policy.recipe import Recipe, save_recipe
    from qdoctor.quant.spec import LayerScheme, get_scheme
    from qdoctor.transforms.smoothing import SmoothingStep

    save_tiny("llama", tmp_path / "m")
    scheme = get_scheme("w8a8-channel-tensor-static").with_overrides(
        {"model.layers.1.mlp.down_proj": LayerScheme(keep="bf16")}, name="planned")
    save_recipe(Recipe(scheme=scheme, smoothing=[SmoothingStep("smoothquant", 0.5)],
                       calibration=CalibrationConfig(n_samples=4, seqlen=32)), str(tmp_path / "plan.yaml"))
    whole, streamed = cli_reports_whole_and_streamed(
        tmp_path, ["eval", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32",
                   "--scheme", "w8a8-channel-tensor-static", "--recipe", str(tmp_path / "plan.yaml"),
                   "--calib-samples", "4", "--calib-seqlen", "32", "--seqlen", "64", "--limit", "3"])
    assert [r["scheme"] for r in streamed["results"]] == [r["scheme"] for r in whole["results"]] == \
        ["full-precision", "w8a8-channel-tensor-static", "planned"]
    for a, b in zip(whole["results"], streamed["results"]):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4), a["scheme"]
        assert (b["quantized_layers"], b["kept_layers"]) == (a["quantized_layers"], a["kept_layers"]), a["scheme"]
    assert streamed["results"][2]["kept_layers"] == 1
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "m"), "--stream", "--tasks", "piqa"]) == 2
    assert "--stream scores perplexity only" in capsys.readouterr().err  # refused before the model loads
