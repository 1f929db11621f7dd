"""A/B of the tuned kernels: 3fd613c's kernel.py (copied to runs/old/kernel.py) against ./kernel.py in one process,
on the same compressed deltas, the same inputs, at the same workspace offsets (not part of the
project). Usage: python runs/dev/ab.py OUT.json"""
import importlib.util, json, math, sys, time
import torch
sys.path.insert(0, ".")
import bench, deltacome
import kernel as knew

spec = importlib.util.spec_from_file_location("kernel_old", "runs/old/kernel.py")
kold = importlib.util.module_from_spec(spec); sys.modules["kernel_old"] = kold; spec.loader.exec_module(kold)
dev = torch.device("cuda")
L2 = torch.cuda.get_device_properties(dev).L2_cache_size
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
OFFS = [0, 1056, 4192]                       # floats (and int32s) into the workspace buffers
out = dict(rows=[])
big = torch.zeros(1 << 22, device=dev); bigl = torch.zeros(1 << 16, dtype=torch.int32, device=dev)


def set_ws(mod, off):
    z = 1 << 16
    big.zero_(); bigl.zero_()                 # a clean workspace wherever it now starts
    mod._WORKSPACES["cuda:0"] = (big[off:off + 2 * z + 16 * 28672 + 4096], bigl[off:off + 8192], z)


def per_kernel(calls):
    from torch.profiler import ProfilerActivity, profile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
    res = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        for k in ("_v_kernel", "_u_kernel"):
            if e.key == k:
                res[k] = us / e.count
    return res


for shape in SHAPES:
    cm = bench.make_delta(shape, dev, on_device=True)
    n = max(1, math.ceil(2 * L2 / cm.nbytes()))
    cms = bench.copies_of(cm, n)
    kds = {"old": [kold.prepare_delta(c, dev) for c in cms], "new": [knew.prepare_delta(c, dev) for c in cms]}
    mods = {"old": kold, "new": knew}
    for B in (1, 16):
        x = torch.randn(B, shape[1], device=dev).half()
        ref = deltacome_ref = knew.delta_matmul_reference(x, cm)
        row = dict(shape=list(shape), batch=B, us={"old": [], "new": []})
        for i, off in enumerate(OFFS):
            for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                mod = mods[name]
                set_ws(mod, off)
                y = mod.delta_matmul(x, kds[name][0], backend="triton")
                assert bench.rel_err(y, ref) < 4e-3, (name, shape, B)
                row["us"][name].append(bench.time_us(
                    [lambda kd=kd, mod=mod: mod.delta_matmul(x, kd, backend="triton") for kd in kds[name]], graph=True))
        for name in ("old", "new"):
            set_ws(mods[name], 0)
            row[name + "_kernels"] = per_kernel(
                [lambda kd=kd, mod=mods[name]: mod.delta_matmul(x, kd, backend="triton") for kd in kds[name]] * max(1, 16 // n))
        o, nw = (sum(row["us"][k]) / len(OFFS) for k in ("old", "new"))
        row["mean"] = dict(old=o, new=nw)
        print(f"{shape[0]}x{shape[1]} B={B:<3} old {o:6.2f} new {nw:6.2f} µs ({nw / o - 1:+.1%})  "
              f"per offset old {[round(v, 2) for v in row['us']['old']]} new {[round(v, 2) for v in row['us']['new']]}  "
              f"V/U old {row['old_kernels']} new {row['new_kernels']}", flush=True)
        out["rows"].append(row)
        json.dump(out, open(sys.argv[1], "w"), indent=1)
