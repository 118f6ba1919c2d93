"""The LLM decoder's ONNX Runtime operators (mmgpt.MatMulPacked, fp32, and mmgpt.MatMulInt8): each is its
arithmetic on every kernel this CPU runs (AVX512, AVX2 and the plain C loops), the layouts are what the kernels
read, weights that do not fit are an error, and the export writes them into the decoder."""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmgpt import ortops


def _session(w: np.ndarray, packed=None, op="MatMulInt8"):
    packed = packed if packed is not None else (ortops.pack_int8(w) if op == "MatMulInt8" else (ortops.pack_f32(w),))
    inputs = ["w", "scale", "colsum"][:len(packed)]
    graph = helper.make_graph(
        [helper.make_node(op, ["a", *inputs], ["y"], domain=ortops.DOMAIN)], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(x, n) for x, n in zip(packed, inputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ortops.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    ortops.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The operator's arithmetic in numpy: rows of `a` to uint8 with their own scale and zero point (a range
    that holds 0), weights to int8 per column, exact integer sums, then the same float32 rescaling."""
    _, scale, colsum = ortops.pack_int8(w)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int64)
    rows = a.reshape(-1, a.shape[-1]).astype(np.float32)
    out = np.empty((rows.shape[0], w.shape[1]), np.float32)
    for m, x in enumerate(rows):
        lo, hi = np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max()))
        s = np.float32((hi - lo) / np.float32(255)) or np.float32(1)
        z = int(np.clip(np.rint(-lo / s), 0, 255))
        xq = np.clip(np.rint(x * (np.float32(1) / s)) + z, 0, 255).astype(np.int64)
        acc = (xq @ q - z * colsum.astype(np.int64)).astype(np.float32)
        out[m] = (s * scale) * acc
    return out.reshape(*a.shape[:-1], w.shape[1])


# AVX2: rows 1-2 in one pass, more in passes over chunks of 1,024 k (2,100: three, the last partial), the last
# column block narrower than 16 (5, 33, 100, 40)
SHAPES = [((1, 64), 48), ((3, 37), 5), ((2, 9, 130), 33), ((1, 1, 2560), 160), ((20, 256), 100), ((0, 16), 16),
          ((5, 2100), 40), ((2, 2100), 16)]


def _kernels(monkeypatch, level: str) -> None:
    """Cap the kernels the next session's operators run: "best" (this CPU's), "avx2", or "portable" (the C
    loops every x86-64 CPU runs)."""
    if level == "avx2" and ortops.ISAS.index(ortops.isa()) < ortops.ISAS.index("avx2"):
        pytest.skip("this CPU has no AVX2 + FMA")
    if level != "best":
        monkeypatch.setenv("MMGPT_ORTOPS_ISA", level)
        assert ortops.isa() == level


LEVELS = ["best", "avx2", "portable"]


@pytest.mark.parametrize("level", LEVELS)
def test_matmul_int8_is_exactly_its_arithmetic(monkeypatch, level):
    _kernels(monkeypatch, level)
    rng = np.random.default_rng(0)
    for a_shape, n in SHAPES:
        w = rng.standard_normal((a_shape[-1], n)).astype(np.float32)
        a = (rng.standard_normal(a_shape) * 3 + 0.5).astype(np.float32)
        y = _session(w).run(None, {"a": a})[0]
        assert y.shape == (*a_shape[:-1], n)
        np.testing.assert_allclose(y, _reference(a, w), rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(y).max(initial=0))))


def test_matmul_int8_is_close_to_the_float_product():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2560, 512)).astype(np.float32)
    a = rng.standard_normal((4, 2560)).astype(np.float32)
    y, want = _session(w).run(None, {"a": a})[0], a @ w
    assert np.abs(y - want).max() < 0.02 * np.abs(want).max()


def test_pack_int8_layout():
    w = np.arange(6 * 20, dtype=np.float32).reshape(6, 20) - 50
    packed, scale, colsum = ortops.pack_int8(w)
    assert packed.shape == (2, 2, 16, 4) and packed.dtype == np.int8  # 20 -> 32 columns, 6 -> 8 rows, zero padded
    q = np.clip(np.rint(w / scale), -127, 127)
    for k, n in ((0, 0), (5, 19), (3, 16), (4, 7)):
        assert packed[n // 16, k // 4, n % 16, k % 4] == q[k, n]
    assert not packed[1, :, 4:].any() and not packed[:, 1, :, 2:].any()
    np.testing.assert_array_equal(colsum, q.sum(0))


def test_weights_that_do_not_fit_are_an_error_not_a_crash():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    s = _session(w)
    with pytest.raises(Exception, match="MatMulInt8"):
        s.run(None, {"a": rng.standard_normal((1, 60)).astype(np.float32)})  # K = 60 against weights packed for 64
    assert s.run(None, {"a": np.ones((1, 64), np.float32)})[0].shape == (1, 32)  # and the session still works


# rows 1-6 in one pass, 7-8 and 13 in groups (8: 4 + 4), K beyond one chunk of 256 with a remainder (600),
# column blocks in and beyond whole groups of 4 (1, 2, 5, 6, 10 blocks)
F32_SHAPES = [((1, 64), 48), ((3, 37), 16), ((2, 9, 130), 32), ((1, 1, 2560), 160), ((20, 256), 96), ((0, 16), 16),
              ((1, 600), 80), ((7, 600), 32), ((8, 300), 96), ((13, 600), 16), ((6, 70), 32)]


@pytest.mark.parametrize("level", LEVELS)
def test_matmul_packed_is_the_float_product(monkeypatch, level):
    _kernels(monkeypatch, level)
    rng = np.random.default_rng(3)
    for a_shape, n in F32_SHAPES:
        w = rng.standard_normal((a_shape[-1], n)).astype(np.float32)
        a = rng.standard_normal(a_shape).astype(np.float32)
        y = _session(w, op="MatMulPacked").run(None, {"a": a})[0]
        assert y.shape == (*a_shape[:-1], n)
        np.testing.assert_allclose(y, (a.astype(np.float64) @ w).astype(np.float32), rtol=1e-4, atol=1e-4)


def test_pack_f32_layout_and_its_inverse():
    w = np.arange(5 * 32, dtype=np.float32).reshape(5, 32)
    packed = ortops.pack_f32(w)
    assert packed.shape == (2, 5, 16)
    for k, n in ((0, 0), (4, 31), (2, 17)):
        assert packed[n // 16, k, n % 16] == w[k, n]
    np.testing.assert_array_equal(ortops.unpack_f32(packed), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        ortops.pack_f32(np.zeros((4, 20), np.float32))


def test_a_packed_weight_of_another_width_is_an_error():
    rng = np.random.default_rng(4)
    s = _session(rng.standard_normal((64, 32)).astype(np.float32), op="MatMulPacked")
    with pytest.raises(Exception, match="MatMulPacked"):
        s.run(None, {"a": np.ones((1, 63), np.float32)})
    assert s.run(None, {"a": np.ones((2, 64), np.float32)})[0].shape == (2, 32)


def test_the_export_packs_the_decoders_linear_layers_and_the_quantizers_get_them_back(tiny_export, tmp_path):
    """`make export` serves MatMulPacked (same weights, the kernels' order) where this CPU runs its kernel, and
    ONNX Runtime's MatMul elsewhere; load_plain gives the quantizers ONNX Runtime's MatMul over exactly those
    weights again. Where the export did not pack, a copy is packed here: the rewrite is the same on any CPU."""
    import shutil

    import onnx

    from mmgpt import names
    from mmgpt.export.llm import load_plain, pack_fp32_matmuls

    path = tiny_export / names.LLM_DIR / names.LLM_ONNX
    graph = onnx.load(str(path)).graph
    packed = [n for n in graph.node if n.op_type == "MatMulPacked"]
    assert bool(packed) == ortops.fast("fp32")
    if not packed:
        shutil.copytree(path.parent, tmp_path / "llm")
        path = tmp_path / "llm" / names.LLM_ONNX
        pack_fp32_matmuls(path)
        graph = onnx.load(str(path)).graph
        packed = [n for n in graph.node if n.op_type == "MatMulPacked"]
    assert packed and not [n for n in graph.node if n.op_type == "MatMul" and n.input[1].endswith("_packed")]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    plain = load_plain(path)
    plain_inits = {t.name: t for t in plain.graph.initializer}
    for node in plain.graph.node:
        assert node.op_type not in ("MatMulPacked", "MatMulInt8")
    for node in packed:
        w = numpy_helper.to_array(plain_inits[node.input[1].removesuffix("_packed")])
        np.testing.assert_array_equal(ortops.pack_f32(w), inits[node.input[1]])


def test_the_operators_are_used_only_where_their_kernels_run(monkeypatch):
    """Without their vector kernels the operators run plain C loops, several times slower than ONNX Runtime's
    MatMul (seen on an AVX2 machine before its kernel was written: a Phi-2-width prefill ~14 s instead of
    ~0.5 s): an export then keeps ONNX Runtime's. MMGPT_ORTOPS forces either way."""
    kernels = ortops.kernels()
    try:
        for force, want in (("", {k: bool(kernels & bit) for k, bit in ortops.KERNELS.items()}),
                            ("0", {"fp32": False, "int8": False}), ("1", {"fp32": True, "int8": True})):
            monkeypatch.setenv("MMGPT_ORTOPS", force)
            ortops.fast.cache_clear()
            assert {k: ortops.fast(k) for k in ortops.KERNELS} == want, force
        monkeypatch.setenv("MMGPT_ORTOPS_ISA", "portable")
        assert ortops.kernels() == 0 and ortops.isa() == "portable"  # what the tests of the plain loops run
    finally:
        ortops.fast.cache_clear()
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if cpu:
        flags = set(next(x for x in cpu.splitlines() if x.startswith("flags")).split(":", 1)[1].split())
        avx2 = {"avx2", "fma"} <= flags
        assert bool(kernels & ortops.KERNELS["fp32"]) == ("avx512f" in flags)  # the AVX2 kernels lost to ORT's
        assert bool(kernels & ortops.KERNELS["int8"]) == ({"avx512f", "avx512_vnni", "avx512bw"} <= flags)
        monkeypatch.delenv("MMGPT_ORTOPS_ISA")
        assert ortops.isa() == ("avx512-vnni" if {"avx512f", "avx512_vnni", "avx512bw"} <= flags else
                                "avx512" if avx2 and "avx512f" in flags else "avx2" if avx2 else "portable")


@pytest.mark.parametrize("op", ["MatMulPacked", "MatMulInt8"])
def test_a_graph_opened_without_its_fast_kernel_says_so_once(op):
    """A decoder exported on an AVX512 machine and served on one without: the log says which kernel runs
    instead and what to do (export again), once per operator while the library is loaded, not per session;
    nothing where the kernel runs."""
    import subprocess
    import sys

    code = f"""
import numpy as np, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_ortops import _session
w = np.ones((32, 16), np.float32)
kept = [_session(w, op={op!r}) for _ in range(2)]  # the library stays loaded while a session holds it
for s in kept:
    s.run(None, {{"a": np.ones((1, 32), np.float32)}})
"""
    env = {k: v for k, v in os.environ.items() if k != "MMGPT_ORTOPS_ISA"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in run.stderr.splitlines() if x.startswith("mmgpt:")]
    fast = bool(ortops.kernels() & ortops.KERNELS["int8" if op == "MatMulInt8" else "fp32"])
    if fast:
        assert not lines
    else:
        assert len(lines) == 1 and f"mmgpt.{op}" in lines[0] and "make export" in lines[0]
        assert ("AVX2 kernel" in lines[0]) == (ortops.isa() != "portable")
