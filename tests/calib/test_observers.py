import pytest
import torch

from qdoctor.calib.collect import CalibrationConfig, calibration_windows, collect_linear_stats
from qdoctor.calib.observers import LinearInputStats
from qdoctor.errors import QDoctorError


def test_running_stats_equal_stats_of_concatenated_activations():
    torch.manual_seed(0)
    batches = [torch.randn(2, 10, 16) * (i + 1) for i in range(3)]
    st = LinearInputStats(16)
    for b in batches:
        st.update(b)
    allx = torch.cat(batches, 0)
    torch.testing.assert_close(st.channel_absmax, allx.abs().amax(dim=(0, 1)))
    torch.testing.assert_close(st.token_absmax, allx.abs().amax(dim=-1))
    assert st.observe("absmax") == pytest.approx(float(allx.abs().max()))
    p = st.observe("percentile:50")
    assert p == pytest.approx(float(allx.abs().amax(-1).flatten().median()), rel=0.05)
    with pytest.raises(QDoctorError):
        st.observe("mse")


def test_stats_round_trip_tensors():
    st = LinearInputStats(4)
    st.update(torch.randn(1, 3, 4))
    again = LinearInputStats.from_tensors(st.channel_absmax, st.token_absmax)
    assert torch.equal(again.token_absmax, st.token_absmax)


def test_hooks_see_each_linear_input(tiny_llama_dir):
    from helpers import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 500, (3, 12))
    captured = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: captured.setdefault("x", []).append(a[0].detach().clone()))
    stats = collect_linear_stats(model, ids, ["model.layers.1.mlp.down_proj"], batch_size=2)
    h.remove()
    x = torch.cat(captured["x"], 0)
    torch.testing.assert_close(stats["model.layers.1.mlp.down_proj"].token_absmax, x.abs().amax(-1))


def test_calibration_windows_are_seeded_and_never_test_split():
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    a = calibration_windows(tok, CalibrationConfig(n_samples=3, seqlen=32, seed=1))
    b = calibration_windows(tok, CalibrationConfig(n_samples=3, seqlen=32, seed=1))
    assert torch.equal(a, b) and a.shape == (3, 32)
    c = calibration_windows(tok, CalibrationConfig(n_samples=3, seqlen=32, seed=1), bos_id=0)
    assert torch.all(c[:, 0] == 0)
    with pytest.raises(QDoctorError, match="leak"):
        CalibrationConfig(source="wikitext2:test")
