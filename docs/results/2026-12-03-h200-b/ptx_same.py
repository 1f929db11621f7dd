"""Phase U's sm_90 PTX (compiled offline, no GPU needed) of 3fd613c's kernel.py (copied to
runs/old/kernel.py) against ./kernel.py with FUSED=False, debug sections and register numbers
removed: prints the differing lines per configuration. Run from the repository root."""
import importlib.util, sys, re
sys.path.insert(0, ".")
import triton, kernel as knew
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
spec = importlib.util.spec_from_file_location("kernel_old", "runs/old/kernel.py")
kold = importlib.util.module_from_spec(spec); sys.modules["kernel_old"] = kold; spec.loader.exec_module(kold)
PTR = {"z_ptr": "*fp32", "acc_ptr": "*fp32", "y_ptr": "*fp16", "base_ptr": "*fp16"}
def ptx(mod, consts, warps, regs):
    fn = mod._u_kernel
    sig = {a: "constexpr" if a in consts else PTR.get(a, "*i32" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts and a not in ("n_items", "n_tiles")}
    opts = dict(num_warps=warps); 
    if regs: opts["maxnreg"] = regs
    p = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    p = re.sub(r"\$L__\w+", "L", p); p = re.sub(r"%(r|rd|f|p|rs|fd|h|hh)\d+", r"%\1", p)
    p = p.split(".section\t.debug")[0].split(".section .debug")[0]
    return [l for l in p.splitlines() if not l.strip().startswith((".loc", ".file", "//", "$L", "L:")) and "debug" not in l]
cases = [dict(BLOCK_B=1, BLOCK_O=512, STAGES=4, WIDTHS=14, PDL=True, EARLY_NEXT=False, U_FP16=False, w=1, r=128),
         dict(BLOCK_B=16, BLOCK_O=128, STAGES=3, WIDTHS=14, PDL=True, EARLY_NEXT=False, U_FP16=True, w=4, r=None),
         dict(BLOCK_B=2, BLOCK_O=256, STAGES=3, WIDTHS=14, PDL=True, EARLY_NEXT=True, U_FP16=False, w=1, r=128)]
for c in cases:
    w, r = c.pop("w"), c.pop("r")
    base = dict(HAS_BASE=True, GROUP=128, **c)
    a = ptx(kold, base, w, r); b = ptx(knew, dict(base, FUSED=False, ALIGNED=False), w, r)
    import difflib
    d = [l for l in difflib.unified_diff(a, b, lineterm="", n=0) if not l.startswith(("---", "+++", "@@"))]
    print(c["BLOCK_B"], "old", len(a), "new", len(b), "differing lines", len(d)); print("\n".join(d[:20]))
