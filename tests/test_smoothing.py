"""The torch Gaussian smoothing against ``scipy.ndimage.gaussian_filter`` (reflect border)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from crane.models.smoothing import gaussian_kernel, gaussian_radius, gaussian_smooth, symmetric_index


def _maps(shape, seed=0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rough maps with a smooth part and sharp edges, values in [0, 1] like probabilities
    return (0.5 * rng.random(shape) + 0.5 * (rng.random(shape) > 0.9)).astype(dtype)


def _scipy(maps: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([gaussian_filter(m, sigma=sigma) for m in maps])


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0, 7.3])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (9, 4), (17, 17), (64, 40), (140, 140)])
def test_matches_scipy_float32(size, sigma):
    maps = _maps((3, *size), seed=size[0] * 100 + size[1])
    out = gaussian_smooth(torch.from_numpy(maps), sigma)
    assert out.dtype == torch.float32 and out.shape == (3, *size)
    np.testing.assert_allclose(out.numpy(), _scipy(maps, sigma), rtol=0, atol=1e-5)


def test_matches_scipy_at_518_sigma_4():
    maps = _maps((2, 518, 518), seed=1)
    np.testing.assert_allclose(gaussian_smooth(torch.from_numpy(maps), 4.0).numpy(), _scipy(maps, 4.0),
                               rtol=0, atol=1e-5)


def test_maps_smaller_than_the_radius_are_mirrored_repeatedly():
    """Radius 16 on lines of 1..6 pixels: the line is mirrored several times (period 2n)."""
    assert gaussian_radius(4.0) == 16
    for n in range(1, 7):
        maps = _maps((1, n, 7 - n + 1), seed=n)
        np.testing.assert_allclose(gaussian_smooth(torch.from_numpy(maps), 4.0).numpy(), _scipy(maps, 4.0),
                                   rtol=0, atol=1e-5)
    for n, radius in ((1, 4), (3, 7), (5, 16)):
        assert symmetric_index(n, radius).tolist() == np.pad(np.arange(n), radius, mode="symmetric").tolist()


def test_sigma_zero_is_identity_and_a_copy():
    maps = torch.from_numpy(_maps((2, 6, 6)))
    out = gaussian_smooth(maps, 0)
    assert torch.equal(out, maps) and out.data_ptr() != maps.data_ptr()
    tiny = gaussian_smooth(maps, 0.1)  # radius int(0.9) = 0: a one-tap kernel, as in scipy
    assert torch.equal(tiny, maps) and np.array_equal(_scipy(maps.numpy(), 0.1), maps.numpy())


def test_kernel_is_scipys():
    from scipy.ndimage import _filters

    for sigma in (0.7, 4.0, 5.5):
        expected = _filters._gaussian_kernel1d(sigma, 0, gaussian_radius(sigma))
        np.testing.assert_allclose(gaussian_kernel(sigma), expected, rtol=1e-12, atol=0)


def test_dtypes_and_leading_dimensions():
    maps = _maps((2, 3, 20, 30), dtype=np.float64, seed=3)
    out = gaussian_smooth(torch.from_numpy(maps), 3.0)
    assert out.dtype == torch.float64
    expected = np.stack([_scipy(m, 3.0) for m in maps])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    half = gaussian_smooth(torch.from_numpy(maps[0]).to(torch.bfloat16), 3.0)
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.float().numpy(), expected[0], rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="H x W"):
        gaussian_smooth(torch.zeros(5), 1.0)


def test_exports_to_onnx_without_custom_ops(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Smooth(torch.nn.Module):
        def forward(self, x):
            return gaussian_smooth(x, 4.0)

    path = tmp_path / "smooth.onnx"
    torch.onnx.export(Smooth().eval(), (torch.zeros(2, 23, 23),), str(path), input_names=["maps"], output_names=["out"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18, dynamo=True,
                      verbose=False)
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    maps = _maps((3, 23, 23), seed=5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"maps": maps})
    np.testing.assert_allclose(out, _scipy(maps, 4.0), rtol=0, atol=1e-5)
