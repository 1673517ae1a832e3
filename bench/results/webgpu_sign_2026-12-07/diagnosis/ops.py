import sys, collections
sys.path.insert(0, "/work/main")
import onnx
from models.data import default_cache_dir
from models.onnx_step import step_graph
jsep = set(open("/tmp/diag/jsep_ops.txt").read().split())
for name, b in [("cnn", 32), ("resnet_fast", 64), ("supermask_fc", 128), ("supermask_conv", 128), ("alexnet", 128), ("physics_alexnet", 128)]:
    g, _ = step_graph(name, b, default_cache_dir() / "steps", target="webgpu")
    m = onnx.load_from_string(g)
    c = collections.Counter(n.op_type for n in m.graph.node)
    print(name, {k: v for k, v in c.items() if k not in jsep})
