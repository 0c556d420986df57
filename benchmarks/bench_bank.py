"""MemoryBank.step vs a naive in-process autograd implementation (issue targets (a), (b)).

(a) NCE, B=256, K=4096, d=128, N=1,281,167: ours vs gathering the K+1 rows per query,
    einsum and autograd (the reference lemniscate way). Target: <= 0.5x the naive time.
(b) exact softmax at N=50,000 and N=1,281,167: ours (chunked, partial statistics) vs
    ``f @ V.T`` + cross-entropy + autograd. Target: <= 0.5x, peak growth <= 2 GB.

Times are medians over ``--repeats`` runs, measured side by side in one process; peak
memory growth is measured in a fresh subprocess per variant (RSS high-water mark).

    python benchmarks/bench_bank.py                 # full sizes
    python benchmarks/bench_bank.py --quick         # small sizes, seconds
    python benchmarks/bench_bank.py --device cuda   # bank on the GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from featurestore import NCE, MemoryBank, Softmax


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive_nce(rows, feats, ids, noise, temperature, z, k):
    """The reference way: gather [B, K+1, d], einsum, NCE loss, autograd."""
    n = rows.shape[0]
    x = feats.detach().clone().requires_grad_(True)
    idx = torch.cat([ids.view(-1, 1), noise], dim=1)
    w = rows[idx].float()
    out = torch.exp(torch.einsum("bkd,bd->bk", w, x) / temperature) / z
    c = k / n + 1e-7
    ln_pmt = torch.log(out[:, 0] / (out[:, 0] + c))
    ln_pon = torch.log((k / n) / (out[:, 1:] + c))
    loss = -(ln_pmt.sum() + ln_pon.sum()) / x.shape[0]
    loss.backward()
    return loss.detach(), x.grad


def naive_softmax(rows, feats, ids, temperature):
    """The reference way: full logits [B, N], cross-entropy, autograd."""
    x = feats.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(x @ rows.float().T / temperature, ids)
    loss.backward()
    return loss.detach(), x.grad


def setup(n, d, b, k, device, seed=0):
    bank = MemoryBank(n, d, seed=seed, device=device, normalize_init=True)
    g = torch.Generator().manual_seed(seed + 1)
    feats = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
    ids = torch.randint(0, n, (b,), generator=g)
    noise = torch.randint(0, n, (b, k), generator=g)
    return bank, feats, ids, noise


def time_it(fn, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_nce(n, d, b, k, repeats, device):
    bank, feats, ids, noise = setup(n, d, b, k, device)
    obj = NCE(num_negatives=k)
    bank.step(feats, ids, obj, noise_ids=noise)  # first step estimates Z
    z = bank.z
    rows = bank.rows
    ids_d, noise_d = ids.to(device), noise.to(device)
    # correctness on a bank frozen at the same rows (momentum 1 keeps rows unchanged)
    bank.momentum = bank._shard.momentum = 1.0
    ours = bank.step(feats, ids, obj, noise_ids=noise)
    _, ref_grad = naive_nce(rows, feats, ids_d, noise_d, 0.07, z, k)
    err = float((ours.grad - ref_grad).abs().max() / ref_grad.abs().max())
    t_ours = time_it(lambda: bank.step(feats, ids, obj, noise_ids=noise), repeats, device)
    t_naive = time_it(lambda: naive_nce(rows, feats, ids_d, noise_d, 0.07, z, k), repeats, device)
    return t_ours, t_naive, err


def bench_softmax(n, d, b, repeats, device):
    bank, feats, ids, _ = setup(n, d, b, 1, device)
    bank.momentum = bank._shard.momentum = 1.0
    obj = Softmax()
    ours = bank.step(feats, ids, obj)
    _, ref_grad = naive_softmax(bank.rows, feats, ids.to(device), 0.07)
    err = float((ours.grad - ref_grad).abs().max() / ref_grad.abs().max())
    t_ours = time_it(lambda: bank.step(feats, ids, obj), repeats, device)
    t_naive = time_it(
        lambda: naive_softmax(bank.rows, feats, ids.to(device), 0.07), repeats, device
    )
    return t_ours, t_naive, err


def peak_growth(variant: str, n: int, d: int, b: int, device: str) -> float:
    """Peak memory growth (GB) of one softmax step, measured in a fresh process."""
    code = (
        "import sys, json, resource, torch\n"
        "sys.path.insert(0, '.')\n"
        "from benchmarks.bench_bank import setup, naive_softmax\n"
        "from featurestore import Softmax\n"
        f"bank, feats, ids, _ = setup({n}, {d}, {b}, 1, '{device}')\n"
        "cuda = '{device}'.startswith('cuda')\n"
        "if cuda: torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()\n"
        "else: base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        f"if '{variant}' == 'ours': bank.step(feats, ids, Softmax())\n"
        f"else: naive_softmax(bank.rows, feats, ids.to('{device}'), 0.07)\n"
        "peak = torch.cuda.max_memory_allocated() if cuda else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps((peak - base) / 2**30))\n"
    ).replace("{device}", device)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="."
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    args = parser.parse_args()
    d, b = 128, 256
    big = 100_000 if args.quick else 1_281_167
    mid = 10_000 if args.quick else 50_000
    k = 1024 if args.quick else 4096
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':<34}{'ours s':>10}{'naive s':>10}{'ratio':>8}{'max rel err':>13}")
    rows = []
    t_o, t_n, err = bench_nce(big, d, b, k, args.repeats, args.device)
    rows.append((f"(a) NCE N={big} K={k}", t_o, t_n, err))
    for n in (mid, big):
        t_o, t_n, err = bench_softmax(n, d, b, max(2, args.repeats // 2), args.device)
        rows.append((f"(b) softmax N={n}", t_o, t_n, err))
    for name, t_o, t_n, err in rows:
        print(f"{name:<34}{t_o:>10.4f}{t_n:>10.4f}{t_o / t_n:>7.2f}x{err:>13.1e}")
    if not args.no_memory:
        ours = peak_growth("ours", big, d, b, args.device)
        naive = peak_growth("naive", big, d, b, args.device)
        print(f"(b) peak growth N={big}: ours {ours:.2f} GB, naive {naive:.2f} GB")
    print(json.dumps({"rows": rows}, default=str))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
