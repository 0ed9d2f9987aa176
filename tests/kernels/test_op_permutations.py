"""random_permutations (the shuffle op's permutation draw): C++ against the reference, uniformity, bad input."""
import collections
import math

import pytest
import torch

import ascood_kernels as ak  # noqa: F401  (loads the extension)
from ascood_kernels import _backend, reference
from ascood_kernels.ops.permutations import draw_permutations, random_permutations

needs_ext = pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")


@needs_ext
@pytest.mark.parametrize("rows", [0, 1, 5, 64])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000])
def test_cpu_matches_reference(rows, n):
    seeds = torch.randint(0, 2**32, (rows,))
    seeds[:1] = 2**32 - 1 if rows else seeds[:1]  # the largest seed
    got = torch.ops.ascood.random_permutations(seeds, n)
    want = reference.random_permutations(seeds, n)
    assert got.dtype == torch.int64 and got.shape == (rows, n)
    assert torch.equal(got, want)
    assert torch.equal(got.sort(1).values, torch.arange(n).expand(rows, n))


def test_rows_depend_on_their_seed_only():
    seeds = torch.tensor([7, 8, 9, 7])
    p = random_permutations(seeds, 30)
    assert torch.equal(p[0], p[3]) and not torch.equal(p[0], p[1])
    assert torch.equal(random_permutations(seeds[2:3], 30)[0], p[2])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_uniform_over_all_permutations(backend):
    """n = 4: each of the 24 permutations about equally often over 24000 consecutive seeds
    (chi-square, 23 degrees of freedom; 60 is p ~ 4e-5). A Sattolo slip (j in [0, i)) gives 6 of them.
    "auto" is the C++ kernel when it is built (else the reference again)."""
    rows = random_permutations(torch.arange(24000), 4, backend=backend).tolist()
    counts = collections.Counter(map(tuple, rows))
    assert len(counts) == 24
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts.values())
    assert chi2 < 60, chi2


def test_every_element_reaches_every_position():
    """n = 40, 8000 rows: element e sits at position q with frequency 1/40 (200 +- 14 expected)."""
    p = random_permutations(torch.arange(8000) * 7919, 40)
    freq = torch.zeros(40, 40)
    for q in range(40):
        freq[q] = torch.bincount(p[:, q], minlength=40).float()
    assert freq.min() > 200 - 5 * 14 and freq.max() < 200 + 5 * 14


def test_draw_reproducible_and_on_device():
    a = draw_permutations(6, 50, torch.Generator().manual_seed(3), torch.device("cpu"))
    b = draw_permutations(6, 50, torch.Generator().manual_seed(3), torch.device("cpu"))
    c = draw_permutations(6, 50, torch.Generator().manual_seed(4), torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort(1).values, torch.arange(50).expand(6, 50))
    # the seeds are one randint per row from the caller's generator
    seeds = torch.randint(0, 2**32, (6,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, reference.random_permutations(seeds, 50))


@pytest.mark.parametrize("seeds,n,match", [
    (torch.tensor([1.0]), 3, "seeds must be a 1-D int64"),
    (torch.zeros(2, 2, dtype=torch.int64), 3, "seeds must be a 1-D int64"),
    (torch.tensor([-1]), 3, r"seeds must hold values in \[0, 2\^32\)"),
    (torch.tensor([2**32]), 3, r"seeds must hold values in \[0, 2\^32\)"),
    (torch.tensor([1]), -1, "n must be an int >= 0"),
    (torch.tensor([1]), 2.5, "n must be an int >= 0"),
])
def test_bad_input_named(seeds, n, match):
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=match):
            random_permutations(seeds, n, backend=backend)


def test_bad_backend_named():
    with pytest.raises(ValueError, match="backend must be"):
        random_permutations(torch.tensor([1]), 3, backend="triton")


@needs_ext
@pytest.mark.parametrize("seeds,n,match", [
    (torch.tensor([1.0]), 3, "seeds must be a 1-D int64"),
    (torch.tensor([-5]), 3, "seeds must hold values"),
    (torch.tensor([1]), -1, "n must be >= 0"),
])
def test_cpu_op_checks_its_arguments(seeds, n, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ascood.random_permutations(seeds, n)


@needs_ext
def test_opcheck_and_compile():
    seeds = torch.randint(0, 2**32, (5,))
    torch.library.opcheck(torch.ops.ascood.random_permutations.default, (seeds, 33))
    fn = torch.compile(lambda s: torch.ops.ascood.random_permutations(s, 20) + 0, fullgraph=True, backend="eager")
    assert torch.equal(fn(seeds), reference.random_permutations(seeds, 20))


def test_large_n_reference_is_exact_in_int64():
    """j = (u * (i + 1)) >> 32 stays below i + 1 for the largest u (no int64 overflow at n ~ 2^31)."""
    u = torch.tensor([2**32 - 1])
    i = 2**31 - 1
    assert int((u * (i + 1)) >> 32) == i
    assert math.prod([int(reference.mix32(torch.tensor([2**32 - 1])))]) < 2**32
