"""Section parallel: one guided denoising step of Wan2.1-T2V-1.3B's configuration (random weights)
shared by 2 processes (gloo, one thread each) against 1 process with 2 threads: the speed-up of
each --parallel way and the share of the step spent in communication, with the bytes each process
sends per step (what the same split would move between GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from harness import Section, Settings, child_error, fmt

TOKENS_LATENT = (16, 3, 16, 16)  # 9 frames at 128x128: 192 tokens, as section wan

# Run under torchrun: the median step (and the seconds inside communication) of each way, JSON from rank 0.
CHILD = textwrap.dedent('''
    import json, statistics, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    from soragen.families.wan import WAN_2_1_T2V_1_3B, from_diffusers
    from soragen.models import fast_paths
    from soragen.models.sequence_parallel import Split, make_split, parallel_predict
    from soragen.models.text import TextEmbedding
    from soragen.pipeline import CachedDiT, resolve_dtype
    from diffusers import WanTransformer3DModel
    modes, repeats, layers = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    dtype = resolve_dtype("auto", torch.device("cpu"))
    torch.manual_seed(0)
    dit = from_diffusers(WanTransformer3DModel(**dict(WAN_2_1_T2V_1_3B, num_layers=layers)).to(dtype))
    fast_paths.install(dit)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 16, 16, generator=g).to(dtype)
    text = TextEmbedding(torch.randn(2, 512, 4096, generator=g).to(dtype), torch.ones(2, 512, dtype=torch.bool), None)
    t = torch.full((2,), 700.0)
    import soragen.models.sequence_parallel as sp
    spent = [0.0]
    for owner, name in ((sp, "_exchange"), (sp, "_pass_on"), (dist, "all_gather")):  # the calls that communicate
        def timed(*a, _f=getattr(owner, name), **k):
            start = time.perf_counter(); out = _f(*a, **k)
            spent[0] += time.perf_counter() - start; return out
        setattr(owner, name, timed)
    results = {}
    for mode in modes:
        cached = CachedDiT(dit, dit.predict, t[:1], x.device, dtype)
        with torch.inference_mode():
            cond = cached.conditioning(x, t, text)
            if dist.get_world_size() == 1:
                run = lambda: dit.predict(x, cond)
            else:
                split = make_split(mode, dit.config.num_heads, True)
                predict = parallel_predict(dit, split) if split.how != "none" else dit.predict
                if split.cfg == 2:
                    from soragen.models.sequence_parallel import CfgSplit
                    step = CfgSplit(lambda xx, tt, tx: predict(xx, cached.conditioning(xx, tt, tx)), split)
                    run = lambda: step(x, t, text)
                else:
                    run = lambda: predict(x, cond)
            run()
            times, comm = [], []
            for _ in range(repeats):
                dist.barrier(); spent[0] = 0.0; start = time.perf_counter(); run()
                times.append(time.perf_counter() - start); comm.append(spent[0])
        results[mode] = {"seconds": statistics.median(times), "comm": statistics.median(comm)}
    if dist.get_rank() == 0:
        print(json.dumps({"dtype": str(dtype).replace("torch.", ""), "results": results}))
    dist.destroy_process_group()
''')


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, processes: int, threads: int, modes: str, repeats: int, layers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={_port()}",
           str(script), modes, str(repeats), str(layers)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise child_error({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}, f"torchrun x{processes}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def sent_bytes(mode: str, element: int, processes: int = 2, depth: int = 30, width: int = 1536,
               tokens: int = 192, batch: int = 2) -> int:
    """Bytes one process sends per step: Ulysses 4 all-to-alls a block (q, k, v, out; all but its own
    share); ring the keys and values round (processes - 1 times a block); cfg the output; each way
    the final layer's patches gathered."""
    local = batch * tokens * width * element // processes
    patches = batch * tokens * 64 * element // processes  # 1x2x2 patches of 16 channels
    per_block = {"ulysses": 4 * local * (processes - 1) // processes, "ring": 2 * local * (processes - 1),
                 "cfg": 0}[mode]
    return depth * per_block + patches * (processes - 1)


def run(settings: Settings) -> Section:
    s = Section("parallel", "One Wan 1.3B step shared by 2 processes (gloo) against 1 process",
                ["case", "dtype", "seconds", "speed-up", "communication", "sent per process per step"])
    repeats, layers = (2, 6) if settings.quick else (4, 30)
    with tempfile.TemporaryDirectory(prefix="soragen-bench-parallel-") as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        one = _torchrun(script, 1, 2, "none", repeats, layers)
        two = _torchrun(script, 2, 1, "ulysses,ring,cfg", repeats, layers)
    base = one["results"]["none"]["seconds"]
    element = 2 if one["dtype"] == "bfloat16" else 4
    s.rows.append(["1 process, 2 threads", one["dtype"], f"{base:.2f}", "1.00x", "", ""])
    for mode, r in two["results"].items():
        s.rows.append([f"2 processes x 1 thread, --parallel {mode}", two["dtype"], f"{r['seconds']:.2f}",
                       f"{base / r['seconds']:.2f}x", f"{r['comm'] / r['seconds']:.0%} of the step",
                       f"{fmt(sent_bytes(mode, element, depth=layers) / 2**20)} MiB"])
    s.data = {"one": one, "two": two}
    s.notes.append(f"{layers} of the model's 30 blocks. One guided step (batch 2), 192 tokens (9 frames at 128x128), 512 text tokens, random weights. "
                   "Communication: the seconds inside all-to-all, all-gather and send/receive (on one machine's "
                   f"shared memory through gloo). On 8 GPUs, Ulysses on a 720p 81-frame clip of the 14B model "
                   f"(75,600 tokens, width 5120, 40 blocks, bf16) would send "
                   f"{sent_bytes('ulysses', 2, 8, 40, 5120, 75600) / 2**30:.1f} GiB per process per step: "
                   f"{sent_bytes('ulysses', 2, 8, 40, 5120, 75600) / 450e9 * 1e3:.0f} ms at 450 GB/s (an H100's "
                   f"NVLink, one way), against the seconds of compute such a step takes.")
    return s
