"""kdcache.targets: top-k log-probs and the relation matrix against float64 dense references."""

import pytest
import torch

from kdcache import schema, targets


def _hidden_and_head(n=7, d=16, v=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * 0.5


# --- top-k log-probs


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_a_dense_float64_reference(temperature):
    hidden, weight = _hidden_and_head()
    ids, logprobs = targets.topk_logprobs(hidden, weight, k=8, temperature=temperature)
    reference = torch.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)
    ref_logprobs, ref_ids = reference.topk(8, dim=-1)
    assert ids.dtype == torch.long and logprobs.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=1e-5, rtol=0)


def test_topk_logprobs_are_in_descending_order():
    hidden, weight = _hidden_and_head()
    _, logprobs = targets.topk_logprobs(hidden, weight, k=10)
    assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()


def test_topk_chunked_equals_unchunked():
    hidden, weight = _hidden_and_head(n=11)
    ids_chunked, lp_chunked = targets.topk_logprobs(hidden, weight, k=5, chunk_rows=3)
    ids_whole, lp_whole = targets.topk_logprobs(hidden, weight, k=5, chunk_rows=1000)
    assert torch.equal(ids_chunked, ids_whole)
    torch.testing.assert_close(lp_chunked, lp_whole, atol=1e-6, rtol=0)


def test_topk_upcasts_bf16_hidden_and_head_to_float32():
    hidden, weight = _hidden_and_head()
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ids, logprobs = targets.topk_logprobs(hidden, weight, k=6)
    reference = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).topk(6, dim=-1)
    assert logprobs.dtype == torch.float32
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(logprobs.double(), reference.values, atol=1e-5, rtol=0)


def test_topk_stays_float32_under_autocast():
    hidden, weight = _hidden_and_head()
    _, plain = targets.topk_logprobs(hidden, weight, k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, autocast = targets.topk_logprobs(hidden, weight, k=4)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)


def test_topk_of_no_rows_gives_empty_outputs():
    hidden, weight = _hidden_and_head()
    ids, logprobs = targets.topk_logprobs(hidden[:0], weight, k=4)
    assert ids.shape == (0, 4) and logprobs.shape == (0, 4)


def test_topk_refuses_k_larger_than_the_vocabulary():
    hidden, weight = _hidden_and_head(v=10)
    with pytest.raises(ValueError, match="k=11"):
        targets.topk_logprobs(hidden, weight, k=11)


def test_tail_mass_is_one_minus_topk_probability_and_never_negative():
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.7, 0.3000001]]))
    torch.testing.assert_close(targets.tail_mass(logprobs), torch.tensor([0.25, 0.0]))
    half = targets.tail_mass(logprobs.half())
    assert half.dtype == torch.float32 and (half >= 0).all()


# --- relation matrix


def test_relation_from_hidden_equals_the_visual_logit_gram_matrix():
    hidden, weight = _hidden_and_head(n=12, d=16, v=300)
    relation = targets.relation_from_hidden(hidden, targets.gram_matrix(weight, chunk=64))
    logits = hidden.double() @ weight.double().T                  # Y (L, V)
    reference = logits @ logits.T                                 # Y Yᵀ
    cos = torch.nn.functional.cosine_similarity(relation.double().flatten(), reference.flatten(), dim=0)
    assert relation.dtype == torch.float32 and relation.shape == (12, 12)
    assert cos >= 0.9999
    assert (relation.double() - reference).norm() / reference.norm() < 1e-5


def test_relation_is_exactly_symmetric():
    hidden, weight = _hidden_and_head(n=9)
    relation = targets.relation_from_hidden(hidden, targets.gram_matrix(weight))
    assert torch.equal(relation, relation.T)


def test_chunked_gram_equals_one_shot():
    _, weight = _hidden_and_head(v=101)
    chunked = targets.gram_matrix(weight, chunk=7)
    one_shot = targets.gram_matrix(weight, chunk=10**6)
    assert chunked.dtype == torch.float32 and chunked.shape == (16, 16)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.double(), weight.double().T @ weight.double(), atol=1e-5, rtol=1e-5)


def test_pack_upper_is_row_major_upper_triangle_with_diagonal():
    matrix = torch.tensor([[0.0, 1.0, 2.0], [9.0, 3.0, 4.0], [9.0, 9.0, 5.0]])
    assert torch.equal(targets.pack_upper(matrix), torch.arange(6.0))


def test_pack_unpack_round_trip_of_a_symmetric_matrix():
    x = torch.randn(5, 5)
    symmetric = x + x.T
    packed = targets.pack_upper(symmetric)
    assert packed.shape == (15,)
    assert torch.equal(targets.unpack_upper(packed, 5), symmetric)
    batched = torch.stack([symmetric, 2 * symmetric])
    assert torch.equal(targets.unpack_upper(targets.pack_upper(batched), 5), batched)


def test_unpack_refuses_a_packed_size_that_does_not_match_visual_len():
    with pytest.raises(ValueError, match="expected 10"):
        targets.unpack_upper(torch.zeros(9), 4)


def test_visual_len_of_packed_inverts_relation_size_and_refuses_non_triangular_sizes():
    assert [targets.visual_len_of_packed(schema.relation_size(n)) for n in (0, 1, 2, 728)] == [0, 1, 2, 728]
    with pytest.raises(ValueError, match="L\\(L\\+1\\)/2"):
        targets.visual_len_of_packed(7)


def test_normalized_relation_has_unit_frobenius_norm_and_returns_the_norm():
    hidden, weight = _hidden_and_head(n=10, v=200)
    relation = targets.relation_from_hidden(hidden, targets.gram_matrix(weight)) * 1e4   # float16 would overflow
    packed, norm = targets.normalized_relation(relation)
    assert packed.dtype == torch.float16 and packed.shape == (55,) and isinstance(norm, float)
    assert norm == pytest.approx(torch.linalg.matrix_norm(relation.double()).item(), rel=1e-6)
    unpacked = targets.unpack_upper(packed.float(), 10)
    assert torch.linalg.matrix_norm(unpacked).item() == pytest.approx(1.0, abs=2e-3)
    torch.testing.assert_close(unpacked * norm, relation, rtol=2e-3, atol=2e-3 * relation.abs().max().item())


def test_normalized_relation_of_a_zero_matrix_gives_zeros_not_nan():
    packed, norm = targets.normalized_relation(torch.zeros(3, 3))
    assert norm == 0.0 and torch.equal(packed, torch.zeros(6, dtype=torch.float16))


def test_normalized_relation_refuses_non_finite_matrices():
    with pytest.raises(ValueError, match="non-finite"):
        targets.normalized_relation(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))


# --- the LM-head GEMM (routes, half operands, no whole-head copy)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, hidden, weight, route", [
    ("cuda", torch.bfloat16, torch.bfloat16, "half"),
    ("cuda", torch.float16, torch.float16, "half"),
    ("cuda", torch.float32, torch.bfloat16, "upcast"),      # rounding float32 hidden to bf16 would lose digits
    ("cuda", torch.bfloat16, torch.float32, "direct"),
    ("cuda", torch.float32, torch.float32, "direct"),
    ("cpu", torch.bfloat16, torch.bfloat16, "upcast"),      # the CPU path stays float32
    ("cpu", torch.float32, torch.float32, "direct"),
    ("cpu", torch.float64, torch.float64, "direct"),
    ("cpu", torch.float64, torch.float32, "direct"),
    ("cpu", torch.float32, torch.float64, "upcast"),
])
def test_head_route_uses_half_operands_only_on_cuda_with_matching_half_dtypes(device, hidden, weight, route):
    assert targets.head_route(device, hidden, weight) == route


def test_half_mm_off_cuda_is_the_exact_product_of_the_half_operands_summed_in_float32():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 300, generator=gen).bfloat16(), torch.randn(300, 40, generator=gen).bfloat16()
    got = targets.half_mm(a, b)
    exact = a.double() @ b.double()                                         # products of the rounded operands
    bound = 300 * 2.0 ** -24 * (a.double().abs() @ b.double().abs())        # float32 accumulation only
    assert got.dtype == torch.float32
    assert bool(((got.double() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="two bf16 or two fp16"):
        targets.half_mm(a, b.float())


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape and dtype of every tensor made by a dtype conversion."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_) and isinstance(out, torch.Tensor):
            self.made.append((tuple(out.shape), out.dtype))
        return out


def test_topk_with_a_bf16_head_never_upcasts_the_whole_head(monkeypatch):
    hidden, weight = _hidden_and_head(n=5, v=50)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    monkeypatch.setattr(targets, "UPCAST_ROWS", 16)                         # 50 rows: 4 slices
    with _Copies() as copies:
        ids, logprobs = targets.topk_logprobs(hidden, weight, k=6)
    head_slices = [shape for shape, dtype in copies.made if dtype == torch.float32 and shape[0] != 5]   # not hidden rows
    assert head_slices == [(16, 16), (16, 16), (16, 16), (2, 16)]          # never (50, 16)
    reference = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).topk(6, dim=-1)
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(logprobs.double(), reference.values, atol=1e-5, rtol=0)


def test_topk_through_the_half_route_matches_a_dense_float64_reference(monkeypatch):
    # The half route's arithmetic (exact products, float32 sums) off CUDA: same logits as the upcast.
    monkeypatch.setattr(targets, "head_route", lambda *dtypes: "half")
    hidden, weight = _hidden_and_head(n=9, v=70)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ids, logprobs = targets.topk_logprobs(hidden, weight, k=7, temperature=1.5, chunk_rows=4)
    reference = torch.log_softmax(hidden.double() @ weight.double().T / 1.5, dim=-1).topk(7, dim=-1)
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(logprobs.double(), reference.values, atol=1e-5, rtol=0)


@CUDA
def test_cuda_half_gemm_equals_the_float32_upcast_up_to_summation_order():
    gen = torch.Generator().manual_seed(5)
    d = 2560
    hidden = torch.randn(300, d, generator=gen).bfloat16().cuda()
    weight = (torch.randn(20000, d, generator=gen) * 3 / d ** 0.5).bfloat16().cuda()
    half = targets.head_logits(hidden, weight)                              # the tensor-core route
    upcast = hidden.float() @ weight.float().T
    bound = 4 * d * 2.0 ** -24 * (hidden.float().abs() @ weight.float().abs().T)
    assert half.dtype == torch.float32 and bool(((half - upcast).abs() <= bound).all())
    ids, logprobs = targets.topk_logprobs(hidden, weight, k=64)
    ref_ids, ref_logprobs = targets.topk_logprobs(hidden.float(), weight.float(), k=64)
    # within float16 storage rounding of the float32 path (ids may swap only where logits tie to that level)
    assert float((ids == ref_ids).float().mean()) > 0.999
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-3, rtol=2 ** -11)
