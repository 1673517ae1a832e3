"""Diagnostic (not a bench): export resnet_fast's "cpu" step graph with the weight gradient of every conv as one
im2col Gather + one MatMul (gather), or three of each, one per kernel row (gather3), instead of today's 9 Slices + 9
MatMuls (old). Usage: weight_grad_variant.py old|gather|gather3 BATCH OUT.onnx (imports the checkout it sits in)."""
import sys, os, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch.nn.functional as F
from models import onnx_step as S

def wg_gather(chunks):
    def weight_grad(go, inp, w, padding):
        n, c, h, wd = inp.shape
        o, _, kh, kw = w.shape
        ph, pw = padding
        ho, wo = go.shape[2], go.shape[3]
        hp, wp = h + 2 * ph, wd + 2 * pw
        rows = F.pad(inp, (pw, pw, ph, ph)).permute(0, 2, 3, 1).reshape(n * hp * wp, c)   # [N*Hp*Wp, C]
        base = (torch.arange(n).reshape(n, 1, 1) * (hp * wp) + torch.arange(ho).reshape(1, ho, 1) * wp
                + torch.arange(wo).reshape(1, 1, wo)).reshape(-1, 1)                       # [K, 1]
        g = go.permute(1, 0, 2, 3).reshape(o, n * ho * wo)                                 # [O, K]
        parts = []
        per = kh // chunks if chunks else kh
        for d0 in range(0, kh, per):
            offs = (torch.arange(d0, d0 + per).reshape(per, 1) * wp + torch.arange(kw).reshape(1, kw)).reshape(1, -1)
            idx = base + offs                                                               # [K, per*kw]
            patches = rows[idx].reshape(n * ho * wo, per * kw * c)                           # [K, per*kw*C]
            parts.append((g @ patches).reshape(o, per, kw, c))
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return out.permute(0, 3, 1, 2)
    return weight_grad

variant, batch, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if variant != "old":
    wg = wg_gather(int(variant[len("gather"):] or 0))
    S.DECOMPOSITIONS["cpu"][S.aten.convolution_backward.default] = S._conv_backward_by(S._conv_input_grad, wg)
spec = S.export_step("resnet_fast", batch, path)
print(path, os.path.getsize(path))
