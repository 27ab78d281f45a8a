"""Importing the official M3AE checkpoint: a synthetic checkpoint in the public layout (random
weights, the public module's names) imported, restored with `load_trained`, and compared with the
public network in PyTorch; x_sub read back where the public training read it; one-line errors."""

import argparse
import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from helpers import write_case  # noqa: E402

from jaxbrats import cli  # noqa: E402
from jaxbrats.engine.trainer import Trainer  # noqa: E402
from jaxbrats.engine.workdir import read_preprocessing  # noqa: E402
from jaxbrats.errors import JaxbratsError  # noqa: E402
from jaxbrats.inference.predict import predict_case, segment_one_case  # noqa: E402
from jaxbrats.inference.trained import load_trained  # noqa: E402
from jaxbrats.interop.m3ae_import import import_m3ae  # noqa: E402
from jaxbrats.interop.torch_m3ae import build, public_checkpoint  # noqa: E402
from jaxbrats.labels import REGIONS, labels_from_regions  # noqa: E402
from jaxbrats.methods import config_from_data  # noqa: E402
from jaxbrats.modalities import MODALITIES  # noqa: E402

# Written here from the public code, not taken from the module under test.
PUBLIC_CHANNELS = ("t1", "t1ce", "t2", "flair")
PUBLIC_OUTPUTS = ("ET", "TC", "WT")
VOLUME = (36, 44, 40)  # x_sub as the public code holds it: (z, y, x) = NIfTI voxel axes (k, j, i) reversed
Z, Y, X = VOLUME
N = 32  # the test case / window edge
BOX = (3, 5, 2)  # the case's corner in the RAS+ grid (x, y, z)
MARKS = {
    ("t1ce", (10, 12, 9)): 7.5,
    ("flair", (20, 30, 15)): -3.25,
}  # public (channel, (z, y, x)) -> value, inside the case


def _public_model(deep=True):
    torch.manual_seed(0)
    model = build(VOLUME, deep_supervised=deep)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gn" in name:  # a non-trivial GroupNorm affine
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for (channel, (z, y, x)), value in MARKS.items():
            model.limage[0, PUBLIC_CHANNELS.index(channel), z, y, x] = value
        # Centre each region's logits on a test case, so that the labels are not all one value.
        logits = model.eval().unet(_to_public(_case()[None]).float())
        model.unet.up1conv.bias -= logits.median(dim=-1).values.flatten(2).median(dim=-1).values[0]
    return model


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """(torch model in float64, checkpoint path, imported run directory, import summary)."""
    folder = tmp_path_factory.mktemp("m3ae")
    model = _public_model()
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=3e-4, weight_decay=1e-4)
    path = folder / "model_1model_best_299.pth.tar"  # the public script's file name
    torch.save(public_checkpoint(model, 299, optimizer.state_dict()), path)
    summary = import_m3ae(path, folder / "run")
    return model.double(), path, folder / "run", summary


@pytest.fixture(scope="module")
def restored(public):
    method, graphdefs, states, config = load_trained(public[2], overrides=["eval.window=[32, 32, 32]"], segmenting=True)
    models = {n: nnx.merge(g, states[n]) for n, g in graphdefs.items()}
    return method, graphdefs, states, models, config


def _to_public(x_ras):
    """(N, x, y, z, 4) jaxbrats channels -> (N, 4, z, y, x) public channels: axes reversed, not flipped."""
    x = np.asarray(x_ras, np.float64)[..., [MODALITIES.index(m) for m in PUBLIC_CHANNELS]]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 3, 2, 1)))


def _from_public(t):
    """(N, 3, z, y, x) public regions -> (N, x, y, z, 3) in jaxbrats' REGIONS order."""
    x = t.detach().numpy().transpose(0, 4, 3, 2, 1)
    return x[..., [PUBLIC_OUTPUTS.index(r) for r in REGIONS]]


def _case(seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (N, N, N, 4)).astype(np.float32)


def test_summary_and_run_directory(public):
    _, path, run, summary = public
    assert summary["unet_parameters"] == 4_704_505 and summary["epoch"] == 299
    assert summary["x_sub_shape"] == [X, Y, Z, 4] and summary["x_sub_public_shape"] == [1, 4, Z, Y, X]
    assert (
        summary["frame"] == "template"
        and summary["source_axcodes"] == "LPS"
        and summary["deep_supervision_heads"] == "imported"
    )
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["name"] == "m3ae" and config["method"]["substitute_shape"] == [X, Y, Z]
    assert (
        config["model"]["upsample"] == "nearest"
        and config["eval"]["blend"] == "uniform"
        and config["eval"]["average"] == "logits"
    )
    assert json.loads((run / "data.json").read_text())["preprocessing"] == {"normalization": "percentile", "margin": 1}
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".")) == []  # no partial folder left
    record = json.loads((run / "import.json").read_text())
    assert record["sha256"] == summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["checkpoint"] == str(path.absolute()) and record["source_axcodes"] == "LPS"


def test_forward_and_deep_heads_match_public(public, restored):
    """Logits and both deep-supervision heads within 1e-4 of the public network (float64) on the same voxels."""
    model = public[0]
    unet = restored[3]["unet"]
    x = np.random.default_rng(1).normal(size=(1, N, N, N, 4)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x))(unet, jnp.asarray(x))
    decoded = {}
    hooks = [
        getattr(model.unet, n).register_forward_hook(lambda _m, _i, o, n=n: decoded.__setitem__(n, o))
        for n in ("up4convb", "up3convb")
    ]
    with torch.no_grad():
        want = model.unet(_to_public(x))
        heads = [model.unet.ds_out[i](decoded[n]) for i, n in enumerate(("up4convb", "up3convb"))]
    for h in hooks:
        h.remove()
    assert np.abs(np.asarray(out["logits"], np.float64) - _from_public(want)).max() <= 1e-4
    for i, head in enumerate(heads):  # before upsampling: the public heads upsample with align_corners=True
        got = unet.decoder.ds_heads[i](out["decoder"][i])
        assert np.abs(np.asarray(got, np.float64) - _from_public(head)).max() <= 1e-4


def test_x_sub_in_the_template_frame(public, restored):
    """x_sub = limage in RAS+ (LPS: x and y reversed), channels reordered; the marked voxels come
    back through M3AE.fill at box_start + their place in the case."""
    method, _, states, models, _ = restored
    limage = public[0].limage.detach().numpy()[0]
    x_sub = np.asarray(states["x_sub"]["image"][...])
    a, b, c = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    for m, modality in enumerate(MODALITIES):
        want = limage[PUBLIC_CHANNELS.index(modality)][c, Y - 1 - b, X - 1 - a]
        np.testing.assert_array_equal(x_sub[..., m], want.astype(np.float32))
    case = {"shape": np.full(3, N, np.int32), "box_start": np.asarray(BOX, np.int32)}
    filled = np.asarray(method.fill(models, jnp.zeros((N, N, N, 4)), jnp.zeros(4, bool), case))
    for (modality, (z, y, x)), value in MARKS.items():
        ras = np.array([X - 1 - x, Y - 1 - y, z]) - BOX  # LPS: i = X - 1 - a, j = Y - 1 - b, k = c
        assert np.all((ras >= 0) & (ras < N))
        assert filled[(*ras, MODALITIES.index(modality))] == value


def test_missing_modalities_filled_as_public_training(public, restored):
    """T1 and T2 missing: jaxbrats' fill + predict equal the public network fed limage read at the
    uncropped volume's voxels (fine-tuning's crop_indexes), and `segment_one_case` (what predict
    and eval run) gives the labels of those probabilities."""
    model = public[0]
    method, graphdefs, states, models, config = restored
    image, present = _case(), np.array([m in ("flair", "t1ce") for m in MODALITIES])
    case = {"shape": np.full(3, N, np.int32), "box_start": np.asarray(BOX, np.int32)}
    filled = method.fill(models, jnp.asarray(image), jnp.asarray(present), case)
    probs = np.asarray(nnx.jit(lambda m, x: method.predict(m, x, None))(models, filled[None]))[0]
    # The public side: the raw-order window of limage (x and y reversed against RAS+), then mirrored like the case.
    x0, y0, z0 = BOX
    window = model.limage[:, :, z0 : z0 + N, Y - y0 - N : Y - y0, X - x0 - N : X - x0].flip(3, 4)
    missing = [PUBLIC_CHANNELS.index(m) for m, p in zip(MODALITIES, present) if not p]
    with torch.no_grad():
        x = _to_public(image[None])
        x[:, missing] = window[:, missing]
        want = _from_public(torch.sigmoid(model.unet(x)))[0]
    assert np.abs(probs - want).max() <= 1e-4
    labels = segment_one_case(method, graphdefs, states, image, present, config.eval, BOX)
    expected = np.asarray(labels_from_regions(want > 0.5, xp=np))
    near = np.any(np.abs(want - 0.5) <= 1e-4, axis=-1)  # where a 1e-4 difference may cross the threshold
    assert np.array_equal(labels[~near], expected[~near]) and near.mean() < 0.01
    assert len(np.unique(expected)) == 4


def test_predict_accepts_the_imported_run(public, tmp_path):
    """`jaxbrats predict` on a NIfTI case missing T1 (its data.json preprocessing, x_sub fill, labels written)."""
    case = write_case(tmp_path / "Brats18_X_1", skip=("t1",), seg=False)
    info = predict_case(public[2], case, tmp_path / "seg.nii.gz", overrides=["eval.window=[32, 32, 32]"])
    assert info["missing"] == ["t1"] and (tmp_path / "seg.nii.gz").is_file()


def _save(path, state, **extra):
    torch.save({"epoch": 3, "state_dict": state, **extra}, path)
    return path


def _state(public):
    return torch.load(public[1], weights_only=True)["state_dict"]


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.pop("module.unet.conv4d.conv2.weight"), r"key module\.unet\.conv4d\.conv2\.weight is missing"),
        (lambda s: s.pop("module.unet.ds_out.1.bias"), r"module\.unet\.ds_out\.1\.bias is missing .*deep-supervision"),
        (lambda s: s.pop("module.limage"), r"key module\.limage .* is missing"),
        (
            lambda s: s.__setitem__("module.unet.conv1a.weight", torch.zeros(16, 4, 3, 3, 2)),
            r"key module\.unet\.conv1a\.weight has shape \(16, 4, 3, 3, 2\), M3AE's network has \(16, 4, 3, 3, 3\)",
        ),
        (
            lambda s: s.__setitem__("module.unet.up1conv.weight", torch.zeros(4, 16, 1, 1, 1)),
            r"a pretraining checkpoint",
        ),
        (
            lambda s: s.__setitem__("module.unet.extra.weight", torch.zeros(3)),
            r"key module\.unet\.extra\.weight is not part",
        ),
    ],
)
def test_bad_keys_are_one_line(public, tmp_path, change, match):
    state = _state(public)
    change(state)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(JaxbratsError, match=match) as excinfo:
        import_m3ae(path, tmp_path / "run")
    assert _one_line(excinfo).startswith(str(path)) and not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


def test_not_a_checkpoint_and_refused_objects(public, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    for path, match in ((tmp_path / "absent.pth", "no such file"), (text, "not a PyTorch checkpoint")):
        with pytest.raises(JaxbratsError, match=match) as excinfo:
            import_m3ae(path, tmp_path / "run")
        _one_line(excinfo)
    pickled = _save(tmp_path / "args.pth", _state(public), args=argparse.Namespace(lr=3e-4))
    refused = r"holds pickled Python objects \(argparse\.Namespace: code\), not only tensors; refused"
    with pytest.raises(JaxbratsError, match=refused) as excinfo:
        import_m3ae(pickled, tmp_path / "run")
    _one_line(excinfo)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(JaxbratsError, match="no 'state_dict'"):
        import_m3ae(tmp_path / "list.pth", tmp_path / "run")


def test_out_dir_must_be_new_or_empty_and_nothing_half_written_stays(public, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(JaxbratsError, match="exists and is not empty") as excinfo:
        import_m3ae(public[1], out)
    _one_line(excinfo)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    import jaxbrats.interop.m3ae_import as m3ae_import

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(m3ae_import, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        import_m3ae(public[1], tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bare_state_dict_without_prefix_or_deep_heads(tmp_path):
    """`model.state_dict()` saved alone (no DataParallel prefix), trained without deep supervision:
    the deep heads are zeros."""
    model = _public_model(deep=False)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    summary = import_m3ae(tmp_path / "bare.pth", tmp_path / "run", source_axcodes="RAS")
    assert summary["epoch"] is None and summary["deep_supervision_heads"].startswith("zeros")
    assert summary["x_sub_shape"] == [X, Y, Z, 4]  # RAS: no flip, axes reversed
    _, _, states, _ = load_trained(tmp_path / "run", segmenting=True)
    heads = states["unet"]["decoder"]["ds_heads"]
    assert all(not np.any(np.asarray(heads[i]["kernel"][...])) for i in (0, 1))
    x_sub = np.asarray(states["x_sub"]["image"][...])
    limage = model.limage.detach().numpy()[0]
    np.testing.assert_array_equal(
        x_sub[..., MODALITIES.index("flair")], limage[PUBLIC_CHANNELS.index("flair")].transpose(2, 1, 0)
    )


def test_permuted_source_axes():
    """Voxel axes S, L, P (permuted and flipped against RAS+): x_sub lands where each voxel lies, and a
    stride-2 kernel meets the same image axis as in the public network (on the case as RAS+ holds it)."""
    import jax
    import torch.nn.functional as F

    from jaxbrats.interop.m3ae_import import convert, orientation

    transform = orientation("SLP")
    n0, n1, n2 = 6, 5, 7  # voxel shape (i: S, j: L, k: P)
    limage = np.random.default_rng(2).normal(size=(1, 4, n2, n1, n0)).astype(np.float32)
    x_sub = convert("limage", limage, transform)
    a, b, c = np.meshgrid(np.arange(n1), np.arange(n2), np.arange(n0), indexing="ij")  # RAS+ shape (n1, n2, n0)
    for m, modality in enumerate(MODALITIES):
        want = limage[0, PUBLIC_CHANNELS.index(modality)][n2 - 1 - b, n1 - 1 - a, c]
        np.testing.assert_array_equal(x_sub[..., m], want)
    weight = np.random.default_rng(3).normal(size=(5, 3, 3, 3, 3)).astype(np.float32)
    kernel = convert("unet.ds1.weight", weight, transform)
    r = np.random.default_rng(4).normal(size=(1, 8, 10, 12, 3)).astype(np.float32)  # RAS+ (x, y, z), channels last
    got = jax.lax.conv_general_dilated(
        r, kernel, (2, 2, 2), [(1, 1)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    # The public network's axes are the voxel axes reversed (k, j, i) = (P: RAS y, L: RAS x, S: RAS z), unflipped.
    public_order = torch.from_numpy(np.ascontiguousarray(r.transpose(0, 4, 2, 1, 3)))
    want = F.conv3d(public_order, torch.from_numpy(weight), stride=2, padding=1).numpy().transpose(0, 3, 2, 4, 1)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4


def test_the_command_and_no_training_in_an_imported_run(public, tmp_path, capsys):
    """`jaxbrats import-m3ae --source-axes RAS --margin 2` imports with those axes (recorded from the
    argument the conversion used; what RAS axes do to x_sub: `test_bare_state_dict_without_prefix_or_deep_heads`)
    and writes the margin predict reads; `jaxbrats train` there is refused in one line naming init_from."""
    run = tmp_path / "run"
    assert cli.main(["import-m3ae", public[1], "--out", run, "--source-axes", "ras", "--margin", "2"]) == 0
    out = capsys.readouterr().out
    assert "imported 4,704,505 U-Net parameters" in out and "--normalize percentile --margin 2;" in out
    record = json.loads((run / "import.json").read_text())
    assert record["source_axcodes"] == "RAS" and record["preprocessing"] == {"normalization": "percentile", "margin": 2}
    assert record["sha256"] == hashlib.sha256(public[1].read_bytes()).hexdigest()
    assert read_preprocessing(run) == {"normalization": "percentile", "margin": 2}  # what `Predictor` crops with
    config = config_from_data(json.loads((run / "config.json").read_text()), "config.json")
    with pytest.raises(
        JaxbratsError, match=r"holds imported weights \(import.json\), not a run to train in; .*init_from"
    ):
        Trainer(config, run)


def test_a_negative_margin_is_refused(public, tmp_path, capsys):
    assert cli.main(["import-m3ae", public[1], "--out", tmp_path / "run", "--margin", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--margin -1: the brain-box margin must be 0 or more" in err
    assert not (tmp_path / "run").exists()


def _poke(key, value):
    def change(state):
        tensor = state[key].clone()
        tensor.view(-1)[3] = value
        state[key] = tensor

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (
            _poke("module.unet.conv2a.conv1.weight", float("nan")),
            r"key module\.unet\.conv2a\.conv1\.weight holds 1 NaN and 0 infinite value\(s\) of 27648",
        ),
        (
            _poke("module.limage", float("-inf")),
            rf"key module\.limage holds 0 NaN and 1 infinite value\(s\) of {4 * Z * Y * X}",
        ),
        (
            lambda s: s.__setitem__("module.unet.up1conv.bias", torch.tensor([1, 0, -1])),
            r"key module\.unet\.up1conv\.bias holds int64 values; M3AE's weights are floating point",
        ),
        (  # BatchNorm's step counter: the public network has no BatchNorm, so not one of its tensors
            lambda s: s.__setitem__("module.unet.conv1b.gn1.num_batches_tracked", torch.tensor(7)),
            r"key module\.unet\.conv1b\.gn1\.num_batches_tracked is not part",
        ),
    ],
    ids=["nan", "inf", "int64", "num_batches_tracked"],
)
def test_weights_that_are_not_finite_floats_are_refused(public, tmp_path, change, match):
    state = _state(public)
    assert all(v.is_floating_point() for v in state.values())  # the public layout: floating-point weights only
    change(state)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(JaxbratsError, match=match) as excinfo:
        import_m3ae(path, tmp_path / "run")
    assert _one_line(excinfo).startswith(str(path)) and not (tmp_path / "run").exists()


class _RunsCode:
    """Unpickling this calls `os.mkdir`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_a_pickle_with_code_is_refused_without_pointing_at_the_unsafe_load(public, tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _save(tmp_path / "evil.pth", _state(public), args=_RunsCode(marker))
    assert cli.main(["import-m3ae", path, "--out", tmp_path / "run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: holds pickled Python objects (" in err and "mkdir: code)" in err
    assert "refused: jaxbrats reads checkpoints with torch.load(weights_only=True)" in err
    assert "weights_only=False" not in err and "safe_globals" not in err  # neither way would run the file's code
    assert not marker.exists() and not (tmp_path / "run").exists()
