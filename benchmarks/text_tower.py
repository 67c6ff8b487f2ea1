"""Target 1 of issue 16: a never-asked text through the text tower, per precision, and the floor.

Three parts. The towers as the product runs them, each text of ``--texts`` varied queries
encoded alone (p50 / p99 wall and CPU milliseconds, interleaved so machine noise lands on all
alike) with its worst cosine to torch fp32: the NumPy tower (`clipsearch query` and a text-only
`Index.search`), the torch tower in fp32 and in bf16 (an `Encoder` holding both towers converts
its text tower with the image tower's precision), each weight-only kernel of `clip.weight_only`
(fp32 activations, bf16 or int8 weights: plain ``F.linear``, oneDNN-prepacked, int8 per channel;
and fbgemm's dynamic int8, whose activations are quantised too), ONNX Runtime's graphs of each
`clip.onnx_graph` kernel (`clip.onnx_text`, with the onnx extra), and the warm `Encoder` of
`clipsearch serve` and ``Index.open(warm=True)`` with the kernel `clip.text_fast` chose. The
products alone (``--kernels``): one 512 x 2048 weight at the median query's token count through
each kernel there is. The floor: this machine's copy bandwidth
times the bytes of weights one query reads in each precision.

    python benchmarks/text_tower.py                  # ViT-B-32, 300 texts, torch on 1 thread
    python benchmarks/text_tower.py --threads 2
    python benchmarks/text_tower.py --arch ViT-B-32-256 --kernels
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from common import fmt, median, ours_env, percentile, print_table, random_model

SUBJECTS = "dog|cat|child|old man|woman|bicycle|red car|sailboat|horse|birthday cake|lighthouse|cathedral"
ACTIONS = "running|sleeping|standing|jumping|eating|waiting|parked|reflected|covered in snow|lit at night"
PLACES = "on a beach|in a forest|in the city|at a wedding|in the kitchen|on a mountain|by the river|at sunset"
EXTRAS = "blurry|black and white|from above|close-up|with friends|in the rain|vintage film photo|panorama"


def varied_queries(count: int, seed: int = 0) -> list[str]:
    """Search-box texts from one word to a pasted caption longer than the context, all distinct
    (no remembered vector helps)."""
    rng = np.random.default_rng(seed)
    subjects, actions, places, extras = (words.split("|") for words in (SUBJECTS, ACTIONS, PLACES, EXTRAS))
    texts: dict[str, None] = {}
    while len(texts) < count:
        parts = [str(rng.choice(subjects))]
        shape = rng.integers(0, 5)
        if shape >= 1:
            parts.append(str(rng.choice(actions)))
        if shape >= 2:
            parts.append(str(rng.choice(places)))
        if shape >= 3:
            parts += [str(e) for e in rng.choice(extras, size=rng.integers(1, 4), replace=False)]
        if shape == 4:
            parts.insert(0, "a photo of a")
        if shape == 4 and rng.random() < 0.3:  # a pasted caption, some past the 77-token context
            clauses = rng.integers(2, 10)
            parts += [
                f"and a {rng.choice(subjects)} {rng.choice(actions)} {rng.choice(places)}" for _ in range(clauses)
            ]
        texts[" ".join(parts) + ("" if rng.random() < 0.5 else f" {rng.integers(1900, 2030)}")] = None
    return list(texts)


def copy_bandwidth() -> float:
    """GB/s of one thread copying 256 MB (read + write), the best of five."""
    source = np.ones(64 << 20, dtype=np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def towers(model: str) -> dict[str, Callable[[list[str]], np.ndarray]]:
    """Unit vectors of texts, per tower as the product runs it (no remembered vectors)."""
    from clipsearch.clip import onnx_graph
    from clipsearch.clip.weight_only import PER_TENSOR_INPUT, usable_kernels
    from clipsearch.encoder import Encoder, TextEncoder, open_encoder

    numpy_tower = TextEncoder(model)
    torch_fp32 = Encoder(model, "cpu", "fp32", towers="text")
    torch_bf16 = Encoder(model, "cpu", "bf16", towers="text")
    warm = open_encoder(model, "cpu", towers="text", warm=True)  # a TextEncoder once its graph is cached
    assert isinstance(warm, (Encoder, TextEncoder))
    found = {
        "numpy fp32 (query CLI, text-only search())": numpy_tower._encode_texts,
        "torch fp32": torch_fp32._encode_texts,
        "torch bf16, whole tower (serve before, image tower in bf16)": torch_bf16._encode_texts,
    }
    for kernel in usable_kernels()[1:]:
        activations = "int8 per tensor" if kernel in PER_TENSOR_INPUT else "fp32"
        found[f"torch {kernel}, {activations} activations"] = kernel_tower(torch_fp32, kernel)
    if onnx_graph.available():
        for kernel, block in onnx_graph.KERNELS.items():
            activations = "int8 per tensor" if block is None else f"int8 per {block} inputs of a row"
            found[f"onnxruntime {kernel}, {activations}"] = kernel_tower(torch_fp32, kernel)
    found[f"warm {type(warm).__name__} (serve, Index.open(warm=True)): {warm.text_path}"] = warm._encode_texts
    return found


def kernel_tower(encoder, kernel: str) -> Callable[[list[str]], np.ndarray]:
    """``encoder``'s text tower with its products in ``kernel``, as `clip.text_fast` builds it,
    on as many threads as torch has."""
    import torch

    from clipsearch.clip.text_fast import with_kernel

    tower = with_kernel(encoder.model, kernel, torch.get_num_threads())

    def run(texts: list[str]) -> np.ndarray:
        tokens = tower.tokenizer(texts, context_length=tower.context_length, truncate=True)
        with torch.inference_mode():
            features = tower.encode_text(tokens).numpy()
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    return run


# Texts a tower encodes in one turn. Turns, not one text each, because ONNX Runtime's threads
# spin for a moment after a run, taking a core from whichever tower runs next.
TURN = 25


def time_towers(model: str, texts: list[str]) -> tuple[list[tuple[str, str, str, str]], int]:
    candidates = towers(model)
    reference = candidates["torch fp32"](texts)
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    cosine: dict[str, float] = {}
    for run in candidates.values():
        run(texts[:2])  # first calls allocate
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in candidates}
    for first in range(0, len(texts), TURN):
        for name, run in candidates.items():
            for text in texts[first : first + TURN]:
                start, start_cpu = time.perf_counter(), time.process_time()
                vectors[name].append(run([text])[0])
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
    rows = []
    for name in candidates:
        cosine[name] = float(np.min(np.sum(np.stack(vectors[name]) * reference, axis=1)))
        rows += [
            (f"new text p50 ms, {name}", fmt(median(wall[name]) * 1e3), "-", "-"),
            (f"new text p99 ms, {name}", fmt(percentile(wall[name], 99) * 1e3), "-", "-"),
            (f"new text p50 CPU ms, {name}", fmt(median(cpu[name]) * 1e3), "-", "-"),
            (f"min cosine to torch fp32 over {len(texts)} texts, {name}", f"{cosine[name]:.6f}", "-", "-"),
        ]
    ids = cached_tower(model).tokenizer.ids(texts, context_length=77, truncate=True)
    return rows, int(np.median(ids.argmax(axis=1) + 1))


def cached_tower(model: str):
    """The NumPy tower the `TextEncoder` of `towers` exported."""
    from clipsearch.clip import numpy_text

    tower = numpy_text.load_cached(model)
    assert tower is not None
    return tower


def floor_rows(model: str, bandwidth: float) -> list[tuple[str, str, str, str]]:
    """The bytes of weights a query reads (every block's and the projection; of the token
    embedding only its rows), and the time they take to stream at ``bandwidth`` (a copy's
    traffic; reading alone ran at 95% of it here)."""
    params = sum(v.size for k, v in cached_tower(model).weights.items() if k != "token_embedding.weight")
    return [
        ("one-thread copy bandwidth GB/s (read + write)", fmt(bandwidth), "-", "-"),
        *[
            (
                f"floor ms, {label}: {params * size / 1e6:.0f} MB of weights at {bandwidth:.1f} GB/s",
                fmt(params * size / bandwidth / 1e6),
                "-",
                "-",
            )
            for label, size in (("fp32", 4), ("bf16", 2), ("int8", 1))
        ],
    ]


def kernel_rows(tokens: int, repeats: int = 10) -> list[tuple[str, str, str, str]]:
    """Milliseconds per 512 x 2048 weight (the MLP's) at ``tokens`` rows, each kernel on 40 such
    weights in turn, so they come from memory as a query's would."""
    import torch

    from clipsearch.clip.weight_only import _LINEARS, usable_kernels

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((2048, 512)).astype(np.float32) for _ in range(40)]
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    transposed = [np.ascontiguousarray(w.T) for w in weights]
    scales = [np.abs(w).max(axis=1) / 127 for w in weights]
    int8 = [np.round(w / s[:, None]).astype(np.int8) for w, s in zip(weights, scales)]
    int8_in_out = [np.ascontiguousarray(q.T) for q in int8]
    buffer = np.empty((512, 2048), dtype=np.float32)

    def dequantised(q: np.ndarray, s: np.ndarray) -> np.ndarray:
        np.copyto(buffer, q, casting="unsafe")
        return (x @ buffer) * s

    xt, xb = torch.from_numpy(x), torch.from_numpy(x).bfloat16()
    tw = [torch.from_numpy(w) for w in weights]
    tb = [w.bfloat16() for w in tw]
    tq = [torch.from_numpy(q) for q in int8]
    ts = [torch.from_numpy(s.astype(np.float32)).bfloat16() for s in scales]
    int8pack = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    kernels: dict[str, tuple[int, Callable[[int], object]]] = {
        "numpy fp32, x @ W.T (state-dict layout, format 1)": (4, lambda i: x @ weights[i].T),
        "numpy fp32, x @ W ([in, out], format 2)": (4, lambda i: x @ transposed[i]),
        "numpy int8 weight, dequantised to a cached fp32 buffer": (1, lambda i: dequantised(int8_in_out[i], scales[i])),
        "torch fp32 linear": (4, lambda i: torch.nn.functional.linear(xt, tw[i])),
        "torch bf16 linear": (2, lambda i: torch.nn.functional.linear(xb, tb[i])),
    }
    if int8pack is not None:
        kernels["torch _weight_int8pack_mm, bf16 activations"] = (1, lambda i: int8pack(xb, tq[i], ts[i]))
    if "int8-dynamic" in usable_kernels():
        dynamic = [_LINEARS["int8-dynamic"](w, None) for w in tw]
        kernels["torch fbgemm dynamic int8 (clip.cpu.Int8Linear), int8 activations"] = (1, lambda i: dynamic[i](xt))
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, (_, run) in kernels.items():
                start = time.thread_time()
                for i in range(len(weights)):
                    run(i)
                times[name].append((time.thread_time() - start) / len(weights))
    rows = []
    for name, (size, _) in kernels.items():
        ms = median(times[name]) * 1e3
        rows.append(
            (
                f"kernel CPU ms per 1M weights at {tokens} tokens, {name}",
                fmt(ms),
                "-",
                f"{2048 * 512 * size / ms / 1e6:.1f} GB/s",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--kernels", action="store_true", help="also time each product kernel alone")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ONNX Runtime threads (the NumPy tower always runs on 1)"
    )
    args = parser.parse_args()
    os.environ.update(ours_env())
    import torch

    torch.set_num_threads(args.threads)
    model = str(random_model(args.arch))
    rows, tokens = time_towers(model, varied_queries(args.texts))
    rows += floor_rows(model, copy_bandwidth())
    if args.kernels:
        rows += kernel_rows(tokens)
    print_table(
        f"A new text through the text tower, {args.arch} (issue 16, target 1)",
        rows,
        [
            f"{args.texts} distinct generated texts (median {tokens} tokens with start and end), each encoded "
            f"alone, the towers taking turns of {TURN}; random weights; NumPy's BLAS on one thread (as queries "
            f"run it), torch and ONNX Runtime on {args.threads} thread(s). CPU ms: the process's CPU time (all "
            "threads), steadier than wall time on a shared machine."
        ],
    )


if __name__ == "__main__":
    main()
