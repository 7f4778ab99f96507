"""The channel-block view of a kernel's unfolding against the unfolding itself."""
import numpy as np
import pytest

from amct_core.decompose import DecomposeMode, kernel_blocks, unfold_weight
from amct_core.decompose.kernel_blocks import KernelBlocks
from amct_core.decompose.spatial_svd import _LAYOUT

MODES = [DecomposeMode.SCFK, DecomposeMode.SCSK, DecomposeMode.FCFK, DecomposeMode.FCSK]


def _blocks(weight, mode, dtype=np.float64):
    rows, cols, _, _ = _LAYOUT[mode]
    return KernelBlocks(weight, rows, cols, dtype)


def _row_order(weight_shape, mode):
    """Index into the unfolding's rows (c, a) of each block row (a, c)."""
    rows = _LAYOUT[mode][0]
    channels, kernel = weight_shape[rows[0]], weight_shape[rows[1]]
    return np.arange(channels * kernel).reshape(channels, kernel).T.ravel()


def _col_order(weight_shape, mode):
    cols = _LAYOUT[mode][1]
    channels, kernel = weight_shape[cols[0]], weight_shape[cols[1]]
    return np.arange(channels * kernel).reshape(channels, kernel).T.ravel()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (4, 7, 3, 5), (5, 4, 5, 3), (3, 3, 2, 4)])
def test_gram_and_core_equal_the_products_of_the_unfolding(mode, shape):
    weight = np.random.default_rng(sum(shape)).standard_normal(shape)
    unfolded = unfold_weight(weight, mode)
    rows, cols = _row_order(shape, mode), _col_order(shape, mode)
    reordered = unfolded[rows][:, cols]
    blocks = _blocks(weight, mode)
    gram = blocks.gram()
    assert gram.flags.f_contiguous
    expected = reordered @ reordered.T
    np.testing.assert_allclose(np.tril(gram), np.tril(expected), rtol=1e-12, atol=1e-12)
    assert not np.any(np.triu(gram, 1))  # only the lower triangle is written
    vectors = np.random.default_rng(1).standard_normal((unfolded.shape[0], 3))
    core = blocks.core(vectors)
    np.testing.assert_allclose(core.reshape(3, -1), vectors.T @ reordered, rtol=1e-12,
                               atol=1e-12)
    # Folding undoes the orders: U's rows as (r, channel, kernel) are the unfolding's rows.
    np.testing.assert_array_equal(blocks.fold_rows(vectors).reshape(3, -1),
                                  vectors.T[:, np.argsort(rows)])
    np.testing.assert_array_equal(blocks.fold_columns(core).reshape(3, -1),
                                  core.reshape(3, -1)[:, np.argsort(cols)])


@pytest.mark.parametrize("mode", MODES)
def test_a_tensorflow_kernel_is_used_as_it_lies(mode):
    hwio = np.random.default_rng(2).standard_normal((3, 5, 6, 4)).astype(np.float32)
    oihw_view = np.transpose(hwio, (3, 2, 0, 1))
    blocks = _blocks(oihw_view, mode, np.float32)
    assert np.shares_memory(blocks.stored, hwio)
    reference = _blocks(np.ascontiguousarray(oihw_view), mode, np.float32)
    assert not np.shares_memory(reference.stored, oihw_view)
    np.testing.assert_allclose(blocks.gram(), reference.gram(), rtol=1e-5, atol=1e-5)


def test_a_kernel_in_another_precision_is_copied():
    hwio = np.random.default_rng(3).standard_normal((3, 3, 4, 4)).astype(np.float32)
    blocks = _blocks(np.transpose(hwio, (3, 2, 0, 1)), DecomposeMode.SCFK, np.float64)
    assert blocks.dtype == np.float64 and not np.shares_memory(blocks.stored, hwio)


def test_rows_and_columns_must_pair_a_channel_with_a_kernel_axis():
    with pytest.raises(ValueError, match="must each pair a channel axis with a kernel axis"):
        KernelBlocks(np.zeros((2, 2, 3, 3)), (0, 1), (2, 3), np.float64)
    with pytest.raises(ValueError, match="must each pair a channel axis with a kernel axis"):
        KernelBlocks(np.zeros((2, 2, 3, 3)), (0, 2), (3, 1), np.float64)


def test_the_copy_is_made_tile_by_tile(monkeypatch):
    from amct_core.decompose import kernel_blocks

    monkeypatch.setattr(kernel_blocks, "COPY_TILE", 2)
    weight = np.random.default_rng(5).standard_normal((7, 4, 3, 5)).astype(np.float32)
    blocks = _blocks(weight, DecomposeMode.FCSK, np.float64)
    assert blocks.stored.dtype == np.float64 and blocks.stored.flags.c_contiguous
    np.testing.assert_array_equal(blocks.stored, weight.transpose(2, 3, 0, 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, "boundary", -1])
def test_all_finite_finds_one_bad_value_in_any_chunk(monkeypatch, bad, where):
    monkeypatch.setattr(kernel_blocks, "FINITE_CHUNK", 64)
    values = np.linspace(-3.0, 3.0, 7 * 47).astype(np.float32).reshape(7, 47)
    assert kernel_blocks.all_finite(values)
    flat = values.reshape(-1)
    flat[{0: 0, "boundary": 64 * 3, -1: flat.size - 1}[where]] = bad
    assert not kernel_blocks.all_finite(values)
    assert not kernel_blocks.all_finite(values.T)  # a strided view
    assert not kernel_blocks.all_finite(values.astype(np.float16))


def test_all_finite_of_empty_and_large_finite_values():
    assert kernel_blocks.all_finite(np.zeros((0, 3), np.float32))
    assert kernel_blocks.all_finite(np.full(10, np.finfo(np.float32).max, np.float32))
