"""Section limit: matmul GFLOP/s in float32 and bfloat16 at the DiT's shapes, the best kernel counting."""

from __future__ import annotations

import torch

from harness import Section, dtype_name, fmt
from matmul import _limit_cache, matmul_gflops



def run(settings) -> Section:
    s = Section("limit", "Matmul throughput at DiT-like shapes, the faster of F.linear and oneDNN "
                "(the machine's limit)",
                ["matmul (m x k) @ (k x n)", "float32 GFLOP/s", "bfloat16 GFLOP/s", "bf16 / fp32"])
    results = matmul_gflops(settings)
    for (m, k, n), r in results.items():
        s.rows.append([f"{m}x{k} @ {k}x{n}", fmt(r[torch.float32]), fmt(r[torch.bfloat16]),
                       f"{r[torch.bfloat16] / r[torch.float32]:.2f}x"])
        s.data[f"{m}x{k}x{n}"] = {dtype_name(d): v for d, v in r.items()}
    fp32, bf16 = _limit_cache[torch.float32], _limit_cache[torch.bfloat16]
    s.rows.append(["limit (max over shapes)", fmt(fp32), fmt(bf16), f"{bf16 / fp32:.2f}x"])
    s.data["limit"] = {"float32": fp32, "bfloat16": bf16}
    return s


