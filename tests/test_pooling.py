import numpy as np
import pytest
import torch

from semidyn_rag import pooling


def reference_mean_pool(h: np.ndarray, s: int, align: str) -> np.ndarray:
    """Loop-by-loop statement of both windowings, independent of the tensor arithmetic."""
    n = len(h)
    out = []
    if align == "start":
        for start in range(0, n, s):
            out.append(h[start : start + s].mean(axis=0))
    else:
        m = -(-n // s)
        pad = m * s - n
        for w in range(m):
            rows = [
                h[i - pad] if i >= pad else np.zeros(h.shape[1]) for i in range(w * s, w * s + s)
            ]
            out.append(np.mean(rows, axis=0))
    return np.stack(out)


@pytest.mark.parametrize("align", ["start", "end"])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8, 16, 32])
def test_mean_pool_matches_reference_for_every_length(ratio, align):
    rng = np.random.default_rng(ratio)
    for length in range(1, 70):
        h = rng.standard_normal((length, 5))
        got = pooling.mean_pool(torch.from_numpy(h), ratio, align).numpy()
        assert got.shape == (pooling.num_windows(length, ratio), 5)
        np.testing.assert_allclose(got, reference_mean_pool(h, ratio, align), rtol=1e-12)


def test_last_tokens_and_window_for_length():
    h = torch.arange(10.0).unsqueeze(1)
    assert pooling.last_tokens(h, 3).squeeze(1).tolist() == [7.0, 8.0, 9.0]
    assert pooling.last_tokens(h, 50).shape[0] == 10
    assert pooling.window_for_length(100, 32) == 4
    assert pooling.num_windows(100, 4) == 25
    with pytest.raises(ValueError):
        pooling.mean_pool(h, 2, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pooling.num_windows(0, 4)
