"""Bad input a user can give, each refused in one line naming the file (issue 29's smaller
errors): a binary or malformed config; and a clean restore: no absl warning from Orbax."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.cli import main
from jaxbrats.config import ConfigError, read_config
from jaxbrats.runtime import checkpoints


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxbrats: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("weights.toml", bytes(range(128, 256)) * 4, "not a text file (byte 0x80 at offset 0 is not UTF-8)"),
        ("latin1.toml", '[train]\nseed = 1  # "é" in Latin-1\n'.encode("latin-1"), "is not UTF-8"),
        ("bad.toml", b"[train\nseed = 1\n", "not valid TOML: Expected ']' at the end of a table declaration"),
        ("config.json", b"[1, 2]", "holds a JSON list, not an object of config sections"),
    ],
    ids=["binary", "latin-1", "toml-syntax", "json-list"],
)
def test_a_config_that_is_not_a_toml_table_is_one_line(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="^" + re.escape(str(path))):
        read_config(path)
    line = _one_error_line(capsys, ["train", "--config", path, "--workdir", tmp_path / "run"])
    assert str(path) in line and fragment in line
    assert not (tmp_path / "run").exists()


def test_a_partial_restore_logs_no_orbax_warning(tmp_path, caplog):
    """eval and predict read only the predicting models (a partial restore); reading the saved tree's
    layout once logged absl's "Metadata file does not exist: .../state/_CHECKPOINT_METADATA"."""
    state = {"models": {"a": {"w": jnp.arange(3.0)}, "b": {"w": jnp.ones(2)}}, "step": jnp.int32(5)}
    manager = checkpoints.checkpoint_manager(tmp_path, "train")
    checkpoints.save(manager, state, {"stage": "train"})
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "checkpoints" / "train" / "5" / "_CHECKPOINT_METADATA").is_file()  # the step's, as saved
    template = {"models": {"a": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}}}
    with caplog.at_level(logging.INFO):
        manager = checkpoints.existing_manager(tmp_path, "train")
        restored, extra = checkpoints.restore(manager, template, partial=True)
    np.testing.assert_array_equal(restored["models"]["a"]["w"], [0.0, 1.0, 2.0])
    assert "b" not in restored["models"] and extra["stage"] == "train"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned
    # The layout check still reads the saved tree: a model of another shape is refused.
    other = {"models": {"a": {"kernel": jax.ShapeDtypeStruct((3,), jnp.float32)}}}
    with pytest.raises(ValueError, match="model 'a' differs"):
        checkpoints.restore(manager, other, partial=True)
