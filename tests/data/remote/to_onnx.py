"""A TorchScript model as ONNX, for the model server of labeld's remote-inference tests: input "input"
[-1, 3, H, W], output "logits" [-1, classes], opset 13 (what benches/export_models.py writes).

  /usr/bin/python3 to_onnx.py MODEL.pt OUT.onnx [CROP]
"""
import os
import sys
import warnings

import torch

pt, out = sys.argv[1], sys.argv[2]
crop = int(sys.argv[3]) if len(sys.argv) > 3 else 224
model = torch.jit.load(pt).eval()
tmp = out + ".partial"
with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")  # torch 1.13 warns about ScriptModule signatures; harmless here
    torch.onnx.export(model, torch.rand(2, 3, crop, crop), tmp, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13)
os.replace(tmp, out)
