"""The command line: `splitserve-export` / `python -m splitserve_export`."""

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from splitserve_export.export import (
    BUILTINS, DTYPES, FORMATS, ExportError, Lora, Request, export, parse_layers, parse_warmup)

EPILOG = """examples:
  splitserve-export --model ./gpt2 --layers 2:10 --out models --name gpt2
  splitserve-export --config gpt2-small-random --seed 0 --layers 2:10 --out models
  splitserve-export --config qwen2.json --layers 4:20 --dtype bfloat16 --lora 8,16,q_proj,v_proj --out models
then: splitserve serve --model gpt2=models/gpt2/1/model.pt (docs/llm.md)"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve-export",
        description="Write decoder layers FIRST..END-1 of a Hugging Face causal LM (GPT-2, "
                    "Llama, Qwen2) as a splitserve model-repository entry: "
                    "OUT/NAME/config.pbtxt and OUT/NAME/VERSION/model.pt, a TorchScript "
                    "trunk with the KV-cache signature forward(hidden, past) -> (hidden, present).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR",
                     help="a model directory with config.json and safetensors weights")
    src.add_argument("--config", metavar="NAME|FILE.json",
                     help="random weights from a config: a JSON file with model_type, or one of "
                          + ", ".join(sorted(BUILTINS)))
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights with --config (default 0)")
    p.add_argument("--layers", required=True, metavar="FIRST:END",
                   help="the trunk: layers FIRST..END-1 (2:10 is 8 layers)")
    p.add_argument("--out", required=True, metavar="DIR", help="the model repository to write into")
    p.add_argument("--name", help="the model's name, which clients send as model_id "
                                  "(default: the model type, e.g. gpt2)")
    p.add_argument("--version", type=int, default=1, help="the version directory (default 1)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the weights' and the cache's dtype (default float32)")
    p.add_argument("--lora", metavar="R,ALPHA,TARGETS",
                   help="add peft LoRA adapters to the trunk's layers, e.g. 8,16,q_proj,v_proj "
                        "(only the adapters require grad)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="the longest context (past + new positions) the trunk accepts "
                        "(default and upper bound: the model's maximum positions)")
    p.add_argument("--warmup", default="1x16", metavar="BATCHxPOSITIONS",
                   help="the warm-up prefill recorded in config.pbtxt (default 1x16)")
    p.add_argument("--format", default="torchscript", choices=list(FORMATS),
                   help="torchscript (default): model.pt with the KV-cache signature; pt2: "
                        "model.pt2, an AOTInductor package of the trunk without a cache "
                        "(inference only; docs/pt2.md)")
    p.add_argument("--kv-sessions", action="store_true",
                   help="record splitserve.kv_sessions in config.pbtxt: the server keeps each "
                        "sequence's KV cache and clients pass back a small handle (docs/llm.md)")
    return p


def quiet() -> None:
    """transformers' and peft's advice (deprecations, token-id notes) is not for
    the exporter's user; errors still raise."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    quiet()
    try:
        req = Request(
            out=Path(args.out),
            layers=parse_layers(args.layers),
            model=args.model,
            config=args.config,
            seed=args.seed,
            name=args.name,
            version=args.version,
            dtype=args.dtype,
            lora=Lora.parse(args.lora) if args.lora else None,
            max_context=args.max_context,
            warmup=parse_warmup(args.warmup),
            kv_sessions=args.kv_sessions,
            format=args.format,
        )
        path = export(req)
    except ExportError as e:
        print(f"splitserve-export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path.parent.parent}; serve it with: splitserve serve "
          f"--model {path.parent.parent.name}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
