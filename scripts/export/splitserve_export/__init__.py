"""splitserve-export: decoder layers of a Hugging Face causal LM as a splitserve
model-repository entry (NAME/config.pbtxt, NAME/1/model.pt) with the KV-cache
signature `forward(hidden, past) -> (hidden, present)`. See docs/llm.md."""

from splitserve_export.export import ExportError, Request, export

__all__ = ["ExportError", "Request", "export"]
