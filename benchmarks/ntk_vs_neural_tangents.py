"""The structured engine against neural-tangents' structured mode, side by side in one run.

Two networks are built from the same numpy weights in PyTorch (this toolkit) and in JAX
(neural-tangents 0.6.5, ``NtkImplementation.STRUCTURED_DERIVATIVES``, jitted, float32):

- ``mlp``: 64-512-512-512-10, ReLU, weights N(0, 2/fan_in), biases N(0, 0.1^2), N = 256
  inputs N(0, 1) of shape (256, 64);
- ``encoder``: pre-LN transformer encoder on real inputs (64, 16, 128), no embedding; per
  block ``x + o(attn(LN1(x)))`` then ``x + ff2(relu(ff1(LN2(x))))``, 2 heads with explicit
  ``softmax(q k^T / sqrt(64)) v``, 2 blocks, affine LayerNorms (eps 1e-5), Linear weights
  N(0, 1/fan_in), biases N(0, 0.02^2), LayerNorm scales 1 + N(0, 0.1^2) and shifts N(0, 0.1^2),
  head Linear(128, 2) on the mean over tokens. All parameters selected.

For each network, the full (N, N, C, C) and the trace (N, N) kernels are timed: the first call
(JAX compiles, torch warms up) separately, then ``--repeats`` calls with the frameworks'
repeats interleaved (neural-tangents, this toolkit in float32, this toolkit in its default
precision, rotating), so load on a shared machine hits both alike; medians of wall and of
process CPU seconds, and their ratios. The kernels are compared entry by entry.

neural-tangents needs its own environment (jax/jaxlib 0.4.23, numpy < 2): the JAX side runs
in a worker process under that environment's Python (``--nt-python``, else ``$NT_PYTHON``,
else the venv that ``benchmarks/nt_env.sh`` builds on demand), reading the weights from an
``.npz`` file and answering one JSON line per command. Without it the torch side runs alone.

    python benchmarks/ntk_vs_neural_tangents.py                  # CPU, writes results
    python benchmarks/ntk_vs_neural_tangents.py --device cuda    # GPU (NT_DEVICE=cuda nt_env.sh)
    python benchmarks/ntk_vs_neural_tangents.py --quick          # 2 repeats, no results file

Results: ``benchmarks/results/ntk_vs_neural_tangents.{json,md}`` (written atomically).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"
NETS = {"mlp": {"n": 256}, "encoder": {"n": 64}}
MLP_WIDTHS = (64, 512, 512, 512, 10)
D, HEADS, BLOCKS, FF, TOKENS, OUT = 128, 2, 2, 256, 16, 2
EPS = 1e-5
OUTPUTS = ("full", "trace")
NT_VERSION = "0.6.5"
INSTALL = "bash benchmarks/nt_env.sh  (or NT_PYTHON=/path/to/python with neural-tangents==0.6.5)"


NOTES = """## Notes (issue 14 engine work; 1 thread, CPU seconds, machine under load 5-17 on 2 cores)

- Fairness: the JAX side stores Linear weights as (in, out) and computes ``x @ W``; written
  as ``x @ W.T`` with torch's layout, neural-tangents' structured mode loses the layer's
  structure and takes ~100x longer (MLP full kernel: > 400 s instead of 0.9 s).
- Engine before -> after this work (pre-LN encoder, full kernel, N=64): 0.86-0.94 s in float32
  and 1.25-1.44 s in the default precision -> 0.27-0.31 s in both. Changes: float32 models
  get float32 products (the default float64 kernel only accumulates: summed per tile pair,
  added in float64; float64 models keep float64 products, 1e-10 tests unchanged); ghost on a
  dense token grid sums token pairs by reshape instead of ``index_add_`` (ghost 0.90 -> 0.55 s);
  per-example-gradient Gram matrices in 64-row blocks (3/4 of the work at n C = 128 rows);
  cost rule refitted (ghost pays ~40 units per multiplied Gram entry, materialise's batched
  per-example product 2.7 units per multiply-add, its Gram only the computed share), so the
  encoder's full kernel takes materialise for the d=128 layers; a layer's weight and bias
  blocks, then all layers of a tile pair, are summed before one addition into the kernel
  (the MLP's 6.5 M-entry float64 kernel was touched 16 times, now twice).
- Profile after (encoder full, one call 0.32 s): per-example Gram 0.08 s, per-example
  gradients (``bmm``, inner dimension T = 16) 0.034 s, ghost for ff2 0.046 s, capture
  (forward, C-batched backward, features) 0.07 s, probe and checks ~0.035 s.
- Floor (table above): the engine is at about 2x the Gram floor on the MLP's full kernel and
  4x on the encoder's, where a third of the time is the capture and probe, which the floor
  does not count. Against neural-tangents the engine alone is 2.0x faster on the encoder's
  full kernel (float32 and default) and 1.7-1.8x on its trace; the self-check of a few
  entries against whole gradients (merged from the kernel-correctness work, on by default)
  takes 0.02 s of the encoder's ~0.27 s, bringing the full kernel to 1.85x, and on the MLP's
  trace kernel it costs as much as the kernel (C = 10 outputs: 20 backward passes of two
  examples; 0.07 of 0.14 s), which puts that item at 1.0x instead of 1.5x.
- MiniLM (Rotten Tomatoes sentences padded to 32 tokens, about 21 kept per example, C = 2,
  all parameters; floor counted the same way, the cheaper strategy per layer, [CLS]-only rows
  in the last block): N=32 full kernel 21 G multiply-adds (~0.5 s here); engine 2.75 s CPU
  without the self-check (capture 1.39 s, contractions 1.02 s, probe), 3.34 s with it (0.60 s),
  against the jacobian method's 28.2 s in the same session (10.3x engine alone, 8.4x with the
  self-check; memory 0.32-0.39 of the jacobian's peak, target 0.25: the interpreter, model and
  self-check gradients are a fixed ~1 GB). Trace kernel N=256: 49.5 s CPU (contractions 37 s)
  against a floor of 708 G multiply-adds (~18 s); N=1024: floor 10.1 T multiply-adds, ~250 CPU
  s at this machine's one-thread rate, so the 300 s target would need the engine within 1.2x of
  its floor; the earlier measured 627 s (2.5x) is where it stands, extrapolating N=256 by N^2
  gives ~790 s under this load.
- This table (2026-12-01, an Intel Xeon with 2 cores, load 3.5-4.7; the runs above were on an
  AMD EPYC under load 5-17, so their ratios do not compare one to one) is the second of two
  runs of this branch (q, k, v fusion, probe cache, self-check independent of C, no capture
  for the check at C <= 2); main before the last change ran in between on the same machine.
  CPU ratios with the self-check, float32 / default [without it]: encoder full: main 1.59x /
  1.61x [1.77x / 1.79x], this branch 1.52x / 1.67x [1.60x / 1.78x] and 1.65x / 1.75x [1.75x /
  1.84x]; encoder trace: main 2.20x / 2.15x, branch 2.09x / 2.64x and 2.12x / 2.48x; MLP full:
  main 1.82x / 1.68x, branch 1.55x / 1.57x and 1.96x / 1.61x; MLP trace: main 1.22x / 1.22x,
  branch 1.24x / 1.21x and 1.23x / 1.18x. The spread between runs (about 10 %) is larger than
  the change: the encoder's self-check (C = 2) takes 0.013-0.018 s instead of 0.028 s of a
  0.25-0.31 s kernel. The encoder's full kernel stays under the 2x target on this machine
  (neural-tangents 0.45 s CPU, the engine 0.25-0.29 s without its check), and so does the
  MLP's trace (1.2x; the engine 0.09 s without its check against a Gram floor of 0.014 s).
- Left: a symmetric-rank-k product for the per-example Gram (torch has none: blocks give
  1.13x instead of 2x). Done since: q, k, v fused into one ghost product when the cost rule
  says it pays (:mod:`ntk._handlers.shared_input`), the probe cached per model.
- Cost rule re-checked (ghost against materialise per Linear weight block, ``linear_costs``;
  process CPU time inside each path, float32 products, 1 thread, load 4-5 on 2 cores, min of
  3 runs). Encoder full kernel, per layer: 128->128 ghost 12.3 ms, materialise 6.8-7.9 ms
  (rule: 419 M against 292 M units); q, k, v fused by ghost 21.8 ms against 20-24 ms apart by
  materialise (956 M against 876 M); ff1 ghost 17.7, materialise 14.5 ms (688 M, 584 M); ff2
  ghost 13.9, materialise 13.5 ms (487 M, 584 M: ghost, a tie). All Linear weights: auto
  0.112-0.121 s, ghost forced 0.132-0.135 s, materialise forced 0.119-0.186 s; whole
  contraction, 8 interleaved calls, medians: auto 0.195 s, ghost forced 0.196 s (float32),
  0.189 / 0.196 s (default), so an earlier reading of ghost 0.143 s against auto 0.21 s is not
  reproduced. Tiny BERT (d 128, 2 layers, ff 512, N 64, padded to 24, ragged): full auto
  0.106-0.137 s, ghost 0.160 s, materialise 0.227 s; trace 0.052 / 0.053 / 0.141 s. MiniLM
  N=32: auto takes ghost for every multi-token layer (the rule's estimates are 3-7x apart):
  full 0.59-0.66 s against 2.6-3.2 s materialised, trace 0.27-0.37 s against 2.0-2.4 s. The
  MLP (one token per example) takes the one-token product for every layer, no decision. Fit:
  measured time per unit of the rule's estimate, per path and layer, is 19-33 ps for ghost and
  for materialise alike on the encoder (full and trace) and MiniLM, 19-45 ps on the tiny BERT
  (its ghost 512->128 full block the outlier, 40-45 ps against materialise's 31 ps, and
  still the faster path there); the rule's two paths are on one scale within the load noise
  (repeats differ by 10-30 %), the one mis-ranked encoder block (ff2, full: ghost 28.5 ps,
  materialise 23 ps per unit) is a 3 % tie, and no constant change moves a choice to a
  measurably faster path: GHOST_ENTRY = 40 and PER_EXAMPLE = 2.7 kept.
"""
"""Analysis notes appended to the markdown (from the profiles of this issue's work)."""


# -- weights and inputs (numpy, shared by both frameworks) -----------------------------------------


def _linear(rng: np.random.Generator, out: dict, name: str, d_in: int, d_out: int,
            w_var: float, b_std: float) -> None:
    out[f"{name}.weight"] = rng.normal(0, np.sqrt(w_var / d_in), (d_out, d_in)).astype(np.float32)
    out[f"{name}.bias"] = rng.normal(0, b_std, d_out).astype(np.float32)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights (torch names and layouts: Linear weight (out, in)) and inputs of both networks."""
    rng = np.random.default_rng(seed)
    a: dict[str, np.ndarray] = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(MLP_WIDTHS)):
        _linear(rng, a, f"mlp.{2 * i}", d_in, d_out, 2.0, 0.1)
    a["mlp.x"] = rng.normal(0, 1, (NETS["mlp"]["n"], MLP_WIDTHS[0])).astype(np.float32)
    for b in range(BLOCKS):
        for ln in ("ln1", "ln2"):
            a[f"encoder.blocks.{b}.{ln}.weight"] = (1 + rng.normal(0, 0.1, D)).astype(np.float32)
            a[f"encoder.blocks.{b}.{ln}.bias"] = rng.normal(0, 0.1, D).astype(np.float32)
        for name in ("q", "k", "v", "o"):
            _linear(rng, a, f"encoder.blocks.{b}.{name}", D, D, 1.0, 0.02)
        _linear(rng, a, f"encoder.blocks.{b}.ff1", D, FF, 1.0, 0.02)
        _linear(rng, a, f"encoder.blocks.{b}.ff2", FF, D, 1.0, 0.02)
    _linear(rng, a, "encoder.head", D, OUT, 1.0, 0.02)
    a["encoder.x"] = rng.normal(0, 1, (NETS["encoder"]["n"], TOKENS, D)).astype(np.float32)
    return a


def params_of(arrays: dict[str, Any], net: str) -> dict[str, Any]:
    """The parameters of one network, without the ``net.`` prefix."""
    return {k[len(net) + 1:]: v for k, v in arrays.items() if k.startswith(net + ".") and
            not k.endswith(".x")}


# -- the torch side ----------------------------------------------------------------------------------


def torch_model(net: str, arrays: dict[str, np.ndarray]):
    """The network as an ``nn.Module`` whose parameters are exactly ``params_of(arrays, net)``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D, eps=EPS), nn.LayerNorm(D, eps=EPS)
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
            self.ff1, self.ff2 = nn.Linear(D, FF), nn.Linear(FF, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (m(h).view(n, t, HEADS, D // HEADS).transpose(1, 2)
                       for m in (self.q, self.k, self.v))
            att = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(n, t, D))
            return x + self.ff2(torch.relu(self.ff1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
            self.head = nn.Linear(D, OUT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(1))

    if net == "mlp":
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(MLP_WIDTHS):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        model: nn.Module = nn.Sequential(*layers[:-1])
    else:
        model = Encoder()
    own = params_of(arrays, net)
    names = {k for k, _ in model.named_parameters()}
    if names != set(own):
        raise RuntimeError(f"internal: {net} parameters {sorted(names ^ set(own))} differ")
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.from_numpy(own[k]))
    return model.eval()


class TorchSide:
    """This toolkit's structured engine on one device, ``float32`` or its default precision."""

    def __init__(self, arrays: dict[str, np.ndarray], device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch, self.device = torch, torch.device(device)
        self.models = {net: torch_model(net, arrays).to(self.device) for net in NETS}
        self.inputs = {net: torch.from_numpy(arrays[f"{net}.x"]).to(self.device) for net in NETS}

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, net: str, output: str, precision: str) -> tuple[np.ndarray, float, float, float]:
        """The kernel, wall and CPU seconds of the call (as ``ntk.structured_ntk``: with the
        engine's self-check of a few entries), and the self-check's CPU seconds."""
        from _common import timed

        from ntk._structured import structured_kernels

        kw = {"dtype": self.torch.float32} if precision == "float32" else {}
        (k, t), wall, cpu = timed(lambda: structured_kernels(
            self.models[net], self.inputs[net], None, {"k": "all"}, output=output, **kw),
            self.sync)
        return k["k"].detach().cpu().double().numpy(), wall, cpu, t.verify_cpu_seconds


# -- the neural-tangents side (runs in its own environment) ------------------------------------------


def _jax_net(net: str):
    import jax
    import jax.numpy as jnp

    def dense(p: dict, name: str, x):  # weights stored (in, out): see nt_worker
        return x @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def layer_norm(p: dict, name: str, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def mlp(p: dict, x):
        for i in range(len(MLP_WIDTHS) - 1):
            x = dense(p, str(2 * i), x)
            if i < len(MLP_WIDTHS) - 2:
                x = jax.nn.relu(x)
        return x

    def encoder(p: dict, x):  # x (n, T, D)
        n, t = x.shape[0], x.shape[1]
        for b in range(BLOCKS):
            pre = f"blocks.{b}"
            h = layer_norm(p, f"{pre}.ln1", x)
            q, k, v = (dense(p, f"{pre}.{m}", h).reshape(n, t, HEADS, D // HEADS)
                       .transpose(0, 2, 1, 3) for m in ("q", "k", "v"))
            att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / (D // HEADS) ** 0.5, axis=-1)
            x = x + dense(p, f"{pre}.o", (att @ v).transpose(0, 2, 1, 3).reshape(n, t, D))
            x = x + dense(p, f"{pre}.ff2", jax.nn.relu(dense(p, f"{pre}.ff1",
                                                             layer_norm(p, f"{pre}.ln2", x))))
        return dense(p, "head", x.mean(1))

    return mlp if net == "mlp" else encoder


def nt_worker(arrays_path: str) -> None:
    """Serve commands on stdin, one JSON line each: ``{"net", "output", "save"}`` -> one JSON
    line on stdout with the wall and CPU seconds of the kernel (and the kernel saved to
    ``save``, an ``.npz`` path, when given); ``{"versions": true}`` -> versions."""
    import jax
    import jaxlib
    import neural_tangents as nt

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs
    arrays = dict(np.load(arrays_path))
    fns: dict[tuple[str, str], Any] = {}
    # Linear weights as (in, out) and ``x @ W``: with torch's (out, in) and ``x @ W.T`` the
    # transpose hides the layer's structure from neural-tangents, which then runs ~100x slower.
    data = {net: (jax.device_put({k: v.T.copy() if v.ndim == 2 else v
                                  for k, v in params_of(arrays, net).items()}),
                  jax.device_put(arrays[f"{net}.x"])) for net in NETS}
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the protocol's stream
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("versions"):
            answer: dict[str, Any] = {"neural_tangents": nt.__version__, "jax": jax.__version__,
                                      "jaxlib": jaxlib.__version__, "numpy": np.__version__,
                                      "backend": jax.default_backend(),
                                      "devices": [str(d) for d in jax.devices()]}
        else:
            key = (cmd["net"], cmd["output"])
            if key not in fns:
                fns[key] = jax.jit(nt.empirical_ntk_fn(
                    _jax_net(cmd["net"]), trace_axes=() if cmd["output"] == "full" else (-1,),
                    vmap_axes=0, implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
            params, x = data[cmd["net"]]
            t0, c0 = time.perf_counter(), time.process_time()
            k = fns[key](x, None, params).block_until_ready()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if cmd.get("save"):
                np.savez(cmd["save"], k=np.asarray(k))
            answer = {"wall": wall, "cpu": cpu}
        import resource

        answer["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        real_stdout.write(json.dumps(answer) + "\n")
        real_stdout.flush()


class NtSide:
    """A neural-tangents worker process under the other environment's Python."""

    def __init__(self, python: str, arrays_path: Path, device: str, threads: int) -> None:
        env = dict(os.environ)
        if not device.startswith("cuda"):
            env["JAX_PLATFORMS"] = "cpu"  # else JAX's default backend (recorded in the results)
        if threads == 1 and not device.startswith("cuda"):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                ).strip()  # (intra_op_parallelism_threads=1 deadlocks jax 0.4.23)
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, __file__, "--nt-worker", str(arrays_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the neural-tangents worker stopped (exit {self.proc.wait()}); "
                               "its error is printed above")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def find_nt_python(given: str | None, build: bool) -> tuple[str | None, str]:
    """The Python of a neural-tangents environment, or None and why not."""
    candidates = [given, os.environ.get("NT_PYTHON")]
    venv = Path(os.environ.get("NT_VENV", ROOT / ".cache" / "nt-venv"))
    if (venv / ".nt-installed").exists():
        candidates.append(str(venv / "bin" / "python"))
    elif build and not any(candidates):
        print(f"building the neural-tangents environment in {venv} (once) ...", file=sys.stderr)
        done = subprocess.run(["bash", str(HERE / "nt_env.sh")], env={**os.environ,
                              "NT_VENV": str(venv)}, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"nt_env.sh failed: {done.stderr[-600:]}"
        candidates.append(str(venv / "bin" / "python"))
    for python in candidates:
        if not python:
            continue
        check = subprocess.run([python, "-c", "import neural_tangents as nt; print(nt.__version__)"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            if check.stdout.strip() != NT_VERSION:
                print(f"note: neural-tangents {check.stdout.strip()} (this benchmark was written "
                      f"for {NT_VERSION})", file=sys.stderr)
            return python, ""
        return None, f"{python} cannot import neural_tangents: {check.stderr.strip()[-300:]}"
    return None, "no neural-tangents environment found"


# -- the floor: the Gram products no method can avoid ------------------------------------------------


def _layers(net: str) -> list[tuple[int, int, int, str]]:
    """(tokens per example, d_in, d_out, kind) of every parameterised layer (kind: linear or
    layernorm)."""
    if net == "mlp":
        return [(1, a, b, "linear") for a, b in itertools.pairwise(MLP_WIDTHS)]
    block = [(TOKENS, D, D, "layernorm")] * 2 + [(TOKENS, D, D, "linear")] * 4 + [
        (TOKENS, D, FF, "linear"), (TOKENS, FF, D, "linear")]
    return block * BLOCKS + [(1, D, OUT, "linear")]


def gram_floor(net: str, output: str) -> float:
    """Multiply-adds of the cheapest Gram products that give the kernel of ``x2 = None``.

    Per Linear layer (n examples, T tokens, C outputs, q = C^2 for full and C for trace,
    half of every symmetric product): the smaller of ghost ``1/2 (nT)^2 (d_in + q d_out)``
    (Gram matrices of inputs and of back-signals over token rows) and materialise
    ``n C T d_in d_out + 1/2 q n^2 d_in d_out`` (per-example gradients and their Gram matrix);
    plus ``1/2 q n^2 d_out`` for its bias and ``q n^2 d`` for a LayerNorm's two vectors.
    Elementwise work, the forward and the backward are not counted.
    """
    n, c = NETS[net]["n"], MLP_WIDTHS[-1] if net == "mlp" else OUT
    q = c * c if output == "full" else c
    total = 0.0
    for t, d_in, d_out, kind in _layers(net):
        if kind == "layernorm":
            total += q * n * n * d_in
            continue
        p = d_in * d_out
        ghost = 0.5 * (n * t) ** 2 * (d_in + q * d_out)
        materialise = n * c * t * p + 0.5 * q * n * n * p
        total += min(ghost, materialise) + 0.5 * q * n * n * d_out
    return total


def gemm_rate(threads: int) -> float:
    """Multiply-adds per second of a large float32 matrix product on this CPU (median of 5)."""
    import torch
    from _common import median, timed

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 512), torch.randn(512, 2048)
    a @ b
    return 2048 * 512 * 2048 / median([timed(lambda: a @ b)[2] for _ in range(5)])


# -- the run -----------------------------------------------------------------------------------------


def compare(ref: np.ndarray, k: np.ndarray) -> dict[str, float]:
    """Entry-by-entry agreement: largest difference relative to the largest entry, and the
    relative Frobenius difference."""
    if ref.shape != k.shape:
        raise RuntimeError(f"kernel shapes differ: neural-tangents {ref.shape}, torch {k.shape}")
    ref, k = ref.astype(np.float64), k.astype(np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs_rel": float(np.abs(ref - k).max()) / scale,
            "frobenius_rel": float(np.linalg.norm(ref - k) / (np.linalg.norm(ref) or 1.0))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from _common import load_average, median, peak_rss_mb, provenance

    load_start = load_average()
    arrays = make_arrays(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ntk_vs_nt_"))
    np.savez(tmp / "arrays.npz", **arrays)
    nt_python, why = find_nt_python(args.nt_python, build=not args.no_build)
    nt = NtSide(nt_python, tmp / "arrays.npz", args.device, args.threads) if nt_python else None
    if nt is None:
        print(f"neural-tangents side skipped ({why}); to run it: {INSTALL}", file=sys.stderr)
    side = TorchSide(arrays, args.device, args.threads)
    import torch

    precisions = ("float32", "default")
    items: dict[str, Any] = {}
    try:
        versions = nt.ask(versions=True) if nt else {"skipped": why, "install": INSTALL}
        for net in args.nets:
            for output in OUTPUTS:
                name = f"{net}_{output}"
                res: dict[str, Any] = {"net": net, "output": output, "n": NETS[net]["n"]}
                kernels: dict[str, np.ndarray] = {}
                runners: dict[str, Any] = {}
                if nt is not None:
                    save = tmp / f"{name}.npz"

                    def nt_call(save: Path | None = None, net: str = net, output: str = output):
                        r = nt.ask(net=net, output=output, save=str(save) if save else None)
                        return r["wall"], r["cpu"], 0.0
                    wall, cpu, _ = nt_call(save)
                    kernels["neural_tangents"] = np.load(save)["k"]
                    if output == "trace":  # neural-tangents averages over the traced axis
                        kernels["neural_tangents"] *= MLP_WIDTHS[-1] if net == "mlp" else OUT
                    res["neural_tangents"] = {"first_wall": wall, "first_cpu": cpu}
                    runners["neural_tangents"] = nt_call
                for p in precisions:
                    k, wall, cpu, _ = side.run(net, output, p)
                    kernels[p] = k
                    res[p] = {"first_wall": wall, "first_cpu": cpu}
                    runners[p] = (lambda p=p, net=net, output=output:
                                  side.run(net, output, p)[1:])
                order = list(runners)
                for r in range(args.repeats):  # interleaved, rotating which goes first
                    for who in order[r % len(order):] + order[:r % len(order)]:
                        wall, cpu, check = runners[who]()
                        res[who].setdefault("walls", []).append(wall)
                        res[who].setdefault("cpus", []).append(cpu)
                        res[who].setdefault("engine_cpus", []).append(cpu - check)
                for who in runners:
                    res[who]["wall"] = median(res[who]["walls"])
                    res[who]["cpu"] = median(res[who]["cpus"])
                    res[who]["engine_cpu"] = median(res[who]["engine_cpus"])
                if "neural_tangents" in kernels:
                    ref = kernels["neural_tangents"]
                    for p in precisions:
                        res[p]["agreement"] = compare(ref, kernels[p])
                        res[p]["speedup_wall"] = res["neural_tangents"]["wall"] / res[p]["wall"]
                        res[p]["speedup_cpu"] = res["neural_tangents"]["cpu"] / res[p]["cpu"]
                        res[p]["speedup_engine_cpu"] = (res["neural_tangents"]["cpu"]
                                                        / res[p]["engine_cpu"])
                res["shape"] = list(kernels["float32"].shape)
                items[name] = res
                print(json.dumps({k: v for k, v in res.items()}, default=str)[:600],
                      file=sys.stderr)
        if nt is not None:
            versions["peak_rss_mb"] = nt.ask(versions=True)["peak_rss_mb"]
    finally:
        if nt is not None:
            nt.close()
    import transformers

    meta = provenance(
        torch=torch.__version__, transformers=transformers.__version__, device=args.device,
        device_name=(torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"),
        threads=args.threads, repeats=args.repeats, seed=args.seed,
        default_dtype="the engine's default (dtype argument omitted)",
        neural_tangents=versions, torch_peak_rss_mb=peak_rss_mb())
    meta["load_average_at_start"], meta["load_average_at_end"] = load_start, load_average()
    meta["gemm_multiply_adds_per_cpu_second"] = gemm_rate(args.threads)
    return {"meta": meta, "items": items}


def markdown(result: dict[str, Any]) -> str:
    meta, items = result["meta"], result["items"]
    lines = ["# This toolkit's structured engine against neural-tangents (structured mode)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Medians of interleaved repeats (the three columns alternate within each "
              "repeat, so load on the shared machine hits them alike); CPU seconds are the "
              "process CPU time (all threads). `ahead` = neural-tangents time / this toolkit's "
              "time (above 1: this toolkit is faster). `first` is the first call (JAX compiles; "
              "torch warms up). This toolkit's times include its self-check of a few entries "
              "against whole gradients (on by default); `[...]`: the CPU ratio without it. "
              "Agreement: largest entry difference relative to the largest "
              "entry of neural-tangents' kernel (its trace kernel, a mean over the C outputs, "
              "times C: this toolkit's trace is the sum).", "",
              "| work | N | neural-tangents wall s (CPU s) | first | this toolkit float32 wall s "
              "(CPU s) | ahead wall (CPU) | agreement | default precision wall s (CPU s) | "
              "ahead wall (CPU) | agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _name, r in items.items():
        ntr = r.get("neural_tangents")

        def t(x: dict) -> str:
            return f"{x['wall']:.3f} ({x['cpu']:.3f})"

        def ahead(x: dict) -> str:
            return (f"{x['speedup_wall']:.2f}x ({x['speedup_cpu']:.2f}x) "
                    f"[{x['speedup_engine_cpu']:.2f}x]") if "speedup_wall" in x \
                else "n/a"

        def agree(x: dict) -> str:
            return f"{x['agreement']['max_abs_rel']:.1e}" if "agreement" in x else "n/a"

        nt_cells = (f"{t(ntr)} | {ntr['first_wall']:.2f}" if ntr else "skipped | ")
        lines.append(f"| {r['net']} {r['output']} {tuple(r['shape'])} | {r['n']} | {nt_cells} | "
                     f"{t(r['float32'])} | {ahead(r['float32'])} | {agree(r['float32'])} | "
                     f"{t(r['default'])} | {ahead(r['default'])} | {agree(r['default'])} |")
    rate = meta.get("gemm_multiply_adds_per_cpu_second")
    if rate:
        lines += ["", f"Floor: multiply-adds of the Gram products no method avoids "
                  f"(`gram_floor`), at this run's float32 matrix-product rate of "
                  f"{rate / 1e9:.1f} G multiply-adds per CPU second, against this toolkit's CPU "
                  "seconds (float32, without the self-check). The capture (forward and C-output "
                  "backward) and the "
                  "elementwise work are above the floor.", "",
                  "| work | floor G multiply-adds | floor CPU s | this toolkit / floor | "
                  "neural-tangents / floor |", "|---|---|---|---|---|"]
        for r in items.values():
            flo = gram_floor(r["net"], r["output"])
            ntr = r.get("neural_tangents")
            lines.append(f"| {r['net']} {r['output']} | {flo / 1e9:.2f} | {flo / rate:.3f} | "
                         f"{r['float32'].get('engine_cpu', r['float32']['cpu']) / (flo / rate):.1f}x | "
                         + (f"{ntr['cpu'] / (flo / rate):.1f}x |" if ntr else "n/a |"))
    return "\n".join(lines) + "\n\n" + NOTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (cuda: JAX on the GPU too)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per framework")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("NTK_BENCH_THREADS", 1)),
                        help="CPU threads of both frameworks (1: XLA's Eigen pool off too)")
    parser.add_argument("--nets", nargs="*", default=list(NETS), choices=list(NETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nt-python", help="Python of an environment with neural-tangents 0.6.5")
    parser.add_argument("--no-build", action="store_true",
                        help="do not build the neural-tangents environment when it is missing")
    parser.add_argument("--quick", action="store_true", help="2 repeats, results not written")
    parser.add_argument("--md-only", action="store_true",
                        help="rewrite the markdown from the JSON (measures the GEMM rate if absent)")
    parser.add_argument("--nt-worker", metavar="NPZ", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nt_worker:
        nt_worker(args.nt_worker)
        return
    sys.path[:0] = [str(ROOT), str(HERE)]
    if args.md_only:
        from _common import write_atomic

        result = json.loads((RESULTS / "ntk_vs_neural_tangents.json").read_text())
        result["meta"].setdefault("gemm_multiply_adds_per_cpu_second", gemm_rate(args.threads))
        write_atomic(RESULTS / "ntk_vs_neural_tangents.json", json.dumps(result, indent=2) + "\n")
        write_atomic(RESULTS / "ntk_vs_neural_tangents.md", markdown(result))
        return
    if args.quick:
        args.repeats = 2
    result = run(args)
    text = markdown(result)
    print(text)
    if not args.quick:
        from _common import write_atomic

        write_atomic(RESULTS / "ntk_vs_neural_tangents.json", json.dumps(result, indent=2) + "\n")
        write_atomic(RESULTS / "ntk_vs_neural_tangents.md", text)


if __name__ == "__main__":
    main()
