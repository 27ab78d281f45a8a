"""`jaxbrats bench`: one side-by-side run on a tiny model writes the JSON rows the issue asks for."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.cli import main

TINY_MODEL = ["--widths", "8", "8", "8", "8", "--blocks", "1", "1", "1", "1"]


def test_bench_times_jax_and_torch_side_by_side(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    from flax import nnx

    from jaxbrats.interop import benchmark

    # Like is timed against like: each PyTorch side, as the bench makes it, computes the JAX
    # side's forward pass from the same weights.
    forwards, make_torch_side = [], benchmark.TorchSide.__init__

    def made_and_compared(side, jax_side, dtype, compiled):
        make_torch_side(side, jax_side, dtype, compiled)
        image = np.random.default_rng(len(forwards)).normal(size=(1, 16, 16, 16, 4)).astype(np.float32)
        unet = nnx.merge(jax_side.graphdefs["unet"], jax_side.model_state())
        with torch.no_grad():
            theirs = np.moveaxis(side.model(side._tensor(image))["logits"].cpu().numpy(), 1, -1)
        forwards.append((np.asarray(unet(jnp.asarray(image))["logits"]), theirs))

    monkeypatch.setattr(benchmark.TorchSide, "__init__", made_and_compared)
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--size",
            "16",
            "--batch",
            "1",
            *TINY_MODEL,
            "--what",  # the evaluation against PyTorch's loop: tests/test_gpu_bench.py
            "train",
            "forward",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--vs",
            "torch",
            "--no-compile",
            "--json",
            out,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device"]["cpu"] and result["device"]["torch"] == torch.__version__
    assert result["command"].startswith("jaxbrats bench --size 16")
    assert [r["what"] for r in result["runs"]] == ["train_step", "forward"]
    for row in result["runs"]:
        assert row["torch"] == "eager" and row["jax_s"] > 0 and row["torch_s"] > 0
        assert row["ratio_torch_over_jax"] > 0
    train, _ = result["runs"]
    assert train["size"] == [16, 16, 16] and train["batch"] == 1 and train["dtype"] == "float32"
    assert train["jax_tflops"] > 0  # XLA's FLOP count of the step
    printed = capsys.readouterr().out
    assert "torch/jax" in printed and "train_step" in printed
    assert len(forwards) == 1  # the train and forward rows' side
    for ours, theirs in forwards:
        assert np.abs(ours).max() > 0.1
        np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_bench_without_torch_rows_times_jax_only(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--size",
            "16",
            "--batch",
            "1",
            *TINY_MODEL,
            "--what",
            "forward",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--dtype",
            "bfloat16",
            "--json",
            out,
        ]
    )
    assert rc == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert row["what"] == "forward" and row["dtype"] == "bfloat16" and "torch_s" not in row


def test_mfu_peak_per_precision(monkeypatch):
    """float32 convolutions run as TF32 on a GPU (JAX's default precision, PyTorch's allow_tf32): the
    MFU of a float32 step divides by the dense TF32 peak, bfloat16's by the dense BF16 one."""
    from jaxbrats.interop import benchmark

    assert benchmark.precision("bfloat16", "gpu") == benchmark.precision("bfloat16", "cpu") == "bf16"
    assert benchmark.precision("float32", "gpu") == "tf32" and benchmark.precision("float32", "cpu") == "fp32"

    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(benchmark.jax, "devices", lambda: [Device()])
    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
    assert benchmark._peak("float32", None) == ("tf32", 494.7)
    assert benchmark._peak("bfloat16", None) == ("bf16", 989.4)
    assert benchmark._peak("float32", 100.0) == ("tf32", 100.0)
    Device.device_kind = "NVIDIA H100 PCIe"
    assert benchmark._peak("float32", None) == ("tf32", 378.0)
    Device.device_kind = "NVIDIA A100-SXM4-80GB"
    assert benchmark._peak("bfloat16", None) == ("bf16", 312.0) and benchmark._peak("float32", None)[1] == 156.0
    row = benchmark._row("train_step", (8,) * 3, 1, "float32", {"jax": 0.5}, 2.4735e14, ("tf32", 494.7))
    assert (row["peak"], row["peak_tflops"], row["mfu"]) == ("tf32", 494.7, 1.0)


def test_size_sets_the_evaluation_window_and_case():
    import argparse

    from jaxbrats.interop.benchmark import add_arguments, eval_shape, eval_window, train_sizes

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def parsed(*argv):
        args = parser.parse_args(argv)
        return train_sizes(args), eval_window(args), eval_shape(args)

    assert parsed() == ([64], 128, (240, 240, 155))
    assert parsed("--size", "32") == ([32], 32, (32, 32, 32))  # one 32^3 window
    assert parsed("--size", "32", "--eval-window", "16") == ([32], 16, (240, 240, 155))
    assert parsed("--size", "32", "--eval-shape", "48", "48", "40") == ([32], 32, (48, 48, 40))
    assert parser.parse_args(["--method", "acdis"]).method == ["acdis"]


def test_other_methods_are_timed_in_evaluation_only(capsys):
    assert main(["bench", "--method", "acdis", "--what", "train"]) == 1
    assert "--what eval" in capsys.readouterr().err
