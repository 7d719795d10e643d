"""MLServer runtime that serves a TorchScript file under torch.no_grad().

Used by mlserver_server.py (scripts/bench/v2.py's MLServer peer). Lives in a
module of its own because MLServer's inference workers are separate processes
that import the runtime by its dotted name.

Tensor names follow Triton's PyTorch backend, as splitserve does: the input is
INPUT__0, the output OUTPUT__0.
"""


import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchScriptRuntime(MLModel):
    async def load(self) -> bool:
        self._module = torch.jit.load(self.settings.parameters.uri, map_location="cpu").eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.no_grad():
            y = self._module(x)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("OUTPUT__0", y.numpy())],
        )
