"""Per-block vs persistent forward: which outputs differ, where, and whether persistent
is deterministic run to run."""
import torch
from sla_tl import tilelang_backend
from sla_tl.settings import Settings, ForwardOutputs

torch.manual_seed(0)
b, h, L, d = 1, 12, 32760, 128
for feature in ("relu", "softmax"):
    s = Settings(block_q=128, block_kv=64, feature_map=feature)
    q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(d, d, device="cuda") / d**0.5
    bias = torch.randn(d, device="cuda") * 0.1
    routing = tilelang_backend.route(q, k, 0.05, 0.0, 128, 64, "bhsd")
    def run(knobs):
        o = tilelang_backend.forward(q, k, v, routing, w, bias, s, {"forward": knobs})
        torch.cuda.synchronize()
        return ForwardOutputs(*(t.clone() for t in o))
    base = run(dict(warp_specialization="manual", num_stages=3))
    base2 = run(dict(warp_specialization="manual", num_stages=3))
    p1 = run(dict(warp_specialization="persistent", num_stages=3))
    p2 = run(dict(warp_specialization="persistent", num_stages=3))
    p3 = run(dict(warp_specialization="persistent", num_stages=2))
    print(feature, "persistent 2 vs 3 stages equal:", all(torch.equal(a, c) for a, c in zip(p1, p3)))
    print(feature, "manual deterministic:", all(torch.equal(a, c) for a, c in zip(base, base2)))
    print(feature, "persistent deterministic:", all(torch.equal(a, c) for a, c in zip(p1, p2)))
    for name in ForwardOutputs._fields:
        x, y = getattr(base, name), getattr(p1, name)
        diff = (x.float() - y.float()).abs()
        n = (diff > 0).sum().item()
        print(f"  {name}: {n} of {x.numel()} differ, max {diff.max().item():.3g}")
        if n and x.dim() >= 3 and name in ("out", "linear", "lse"):
            idx = (diff > 0).nonzero()
            rows = idx[:, 2]
            tiles = torch.unique(rows // 128)
            print(f"    rows: {torch.unique(rows).numel()} distinct, tiles {tiles.numel()} "
                  f"of 256, first tiles {tiles[:10].tolist()}, heads {torch.unique(idx[:,1]).tolist()[:12]}")
            if x.dim() == 4:
                print(f"    cols distinct: {torch.unique(idx[:, 3]).numel()}")
