"""The M3AE authors' own UNet3D_g (github.com/ccarliu/m3ae, imported from a clone outside jaxbrats),
jaxbrats' PyTorch port and the JAX network compute the same logits with the same weights.

Skipped unless JAXBRATS_M3AE_REPO names a clone of that repository (its code is never copied here).
"""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
REPO = os.environ.get("JAXBRATS_M3AE_REPO")
pytestmark = pytest.mark.skipif(
    not REPO, reason="JAXBRATS_M3AE_REPO unset: no clone of github.com/ccarliu/m3ae to compare with"
)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_m3ae_authors

    return bench_m3ae_authors


@pytest.fixture(scope="module")
def nets(bench):
    return bench.build_networks(REPO, 16)


def test_same_network_as_the_authors(bench, nets):
    result = bench.agreement(nets, 16)
    assert bench.check(result, 1e-4) == [], result
    assert result["logits_max_abs"] > 0.1  # not a degenerate all-zero output
    # jaxbrats' deep heads upsample with half-pixel centres, the authors' with align_corners=True.
    assert min(result["jax_vs_authors_deep_heads"]) > 1e-3


def test_a_changed_weight_is_caught(bench, nets):
    """The check can fail: one bias changed in the port makes it disagree with the authors'."""
    import torch

    bias = nets["port"].up1conv.bias
    with torch.no_grad():
        bias[0] += 0.01
    try:
        failures = bench.check(bench.agreement(nets, 16), 1e-4)
    finally:
        with torch.no_grad():
            bias[0] -= 0.01
    assert any(line.startswith("port_vs_authors ") for line in failures), failures
