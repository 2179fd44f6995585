"""An MLServer runtime that runs an ONNX model with onnxruntime, for labeld's remote-inference tests
(tests/common/model_server.rs copies it beside each model-settings.json). MLServer 1.7 ships no ONNX
runtime of its own; this is the smallest one: the first input in, every output back, as FP32."""
import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = onnxruntime.SessionOptions()
        # The tests share two cores with labeld: one thread, as a busy server would give each request.
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        results = self._session.run(None, {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, y.astype(np.float32)) for name, y in zip(self._outputs, results)],
        )
