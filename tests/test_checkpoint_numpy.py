"""A nerfstudio checkpoint saved under numpy 1 loads under numpy 2 and the other way round.

numpy 2 renamed the module of its scalar constructor (numpy.core.multiarray -> numpy._core.multiarray),
and pickles name it: a checkpoint pretrained on a numpy-1 machine (this project's venv) and edited on a
numpy-2 one (the bare GPU machine of bench/gpu) must still pass read_checkpoint's weights-only load.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from nerf_trainer.trainer import SCALAR_PICKLE_NAMES, read_checkpoint


@pytest.mark.parametrize("name", SCALAR_PICKLE_NAMES)
def test_read_checkpoint_takes_numpy_scalars_under_either_numpy_name(tmp_path, name):
    path = tmp_path / "step-000000003.ckpt"
    state = {"step": 3, "pipeline": {"w": torch.ones(2)}, "optimizers": {}, "scalers": {"scale": np.float64(0.5)}}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # the legacy format: one plain pickle stream
    raw = path.read_bytes()
    this = np.float64(0).__reduce__()[0]  # the constructor as this numpy names it
    here = f"{this.__module__}\nscalar\n".encode()
    assert raw.count(here) == 1, "the pickle does not name numpy's scalar constructor as expected"
    path.write_bytes(raw.replace(here, f"{name.rsplit('.', 1)[0]}\nscalar\n".encode()))  # as numpy 1 or 2 names it

    loaded = read_checkpoint(path)
    assert (
        loaded["step"] == 3 and loaded["scalers"]["scale"] == 0.5 and isinstance(loaded["scalers"]["scale"], np.float64)
    )
    assert torch.equal(loaded["pipeline"]["w"], torch.ones(2))


def test_a_checkpoint_holding_a_type_not_allowed_says_which_not_damaged(tmp_path):
    path = tmp_path / "step-000000003.ckpt"
    torch.save({"step": 3, "pipeline": {}, "optimizers": {}, "scalers": {"odd": Fraction(1, 2)}}, path)

    with pytest.raises(ValueError, match=r"holds fractions\.Fraction, which a weights-only load does not allow"):
        read_checkpoint(path)
