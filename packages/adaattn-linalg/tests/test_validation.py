from __future__ import annotations

import adaattn_linalg
import pytest
import torch
from adaattn_linalg import _validation as v


def test_public_api_is_documented_and_exported():
    assert adaattn_linalg.__version__ == "0.1.0"
    for name in adaattn_linalg.__all__:
        obj = getattr(adaattn_linalg, name)
        if name != "__version__":
            assert obj.__doc__, name
            assert len(obj.__doc__) > 40, name


def test_check_tensor_messages_name_argument():
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor"):
        v.check_tensor([1.0], "x")
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        v.check_tensor(torch.ones(2, dtype=torch.int64), "x")
    with pytest.raises(TypeError, match="`x`"):
        v.check_tensor(torch.ones(2, dtype=torch.bool), "x")
    with pytest.raises(TypeError, match="`x`"):
        v.check_tensor(torch.ones(2, dtype=torch.complex64), "x")
    with pytest.raises(ValueError, match="`x` is empty"):
        v.check_tensor(torch.ones(0), "x")
    with pytest.raises(ValueError, match="`x` contains NaN or Inf"):
        v.check_tensor(torch.tensor([1.0, float("-inf")]), "x")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        v.check_tensor(torch.ones(3), "x", min_ndim=2)
    with pytest.raises(TypeError, match="`k` must be an int"):
        v.check_int(True, "k")
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        v.check_int(0, "k", minimum=1)
    with pytest.raises(ValueError, match="either `seed` or `generator`"):
        v.make_generator(1, torch.Generator(), torch.device("cpu"))
    with pytest.raises(ValueError, match="`p` must be finite"):
        v.check_float(float("nan"), "p")


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere"])
def test_probes_have_identity_second_moment(distribution):
    g = torch.Generator().manual_seed(0)
    z = v.probes(
        (6, 20000), distribution, dtype=torch.float64, device=torch.device("cpu"), generator=g
    )
    second = z @ z.T / z.shape[1]
    # 20000 samples: entries of the second-moment matrix within ~5/√20000 ≈ 0.035
    torch.testing.assert_close(second, torch.eye(6, dtype=torch.float64), atol=0.05, rtol=0)
    if distribution == "sphere":
        torch.testing.assert_close(z.norm(dim=0), torch.full((20000,), 6**0.5, dtype=torch.float64))
    if distribution == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
