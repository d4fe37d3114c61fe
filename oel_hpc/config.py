"""The configuration schema (structured configs registered with Hydra) and its validation.

The YAML groups in `conf/` fill these dataclasses; OmegaConf type-checks every override against them, and a value
that is one of a set is an enum (a `Choice`), so OmegaConf refuses any other. `validate` then checks what types
cannot: values in range, files that must exist, cross-field limits. It runs before any stage starts, so bad input
costs nothing. A job re-applies the schema when it reads its run's config.yaml (`load_run_config`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from oel_hpc.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"
GROUPS = ("env", "model", "engine", "trainer", "cluster", "experiment", "prompts")


class Choice(str, Enum):
    """A config value that is one of a set. A str, so code compares it with plain strings, and it prints, hashes
    (json) and writes to YAML as its value: each member's name is its value."""

    def __str__(self) -> str:
        return self.value


class Dtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Generator(Choice):  # the set oel_hpc.games.GENERATORS (test_config checks they agree)
    oel = "oel"
    textarena = "textarena"


class SeedScheme(Choice):  # the set oel_hpc.games.SEED_SCHEMES
    oel = "oel"
    paper = "paper"


class ExperienceMode(Choice):
    items = "items"
    free_text = "free_text"


class ParseStyle(Choice):  # the set oel_hpc.experience.PARSE_STYLES
    marker = "marker"
    marker_anywhere = "marker_anywhere"
    list = "list"


class LossImpl(Choice):
    auto = "auto"
    chunked = "chunked"
    fused = "fused"


class EvalSteps(Choice):
    first_last = "first_last"
    all = "all"


class EngineName(Choice):
    hf = "hf"
    vllm = "vllm"


class TrainerName(Choice):
    torch = "torch"
    megatron = "megatron"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Parallel(Choice):
    ddp = "ddp"
    fsdp = "fsdp"


class Attention(Choice):
    auto = "auto"
    sdpa = "sdpa"
    te = "te"
    local = "local"


class Optimizer(Choice):
    auto = "auto"
    adamw = "adamw"
    distributed = "distributed"


class Launcher(Choice):
    local = "local"
    slurm = "slurm"


class ContainerRuntime(Choice):
    apptainer = "apptainer"
    pyxis = "pyxis"


class Verify(Choice):
    cheap = "cheap"
    full = "full"


class WandbMode(Choice):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 1024


@dataclass
class RunConfig:
    name: str = "tiny-frozenlake"
    root: str = "runs"
    overwrite: bool = False  # a finished stage whose config changed is redone instead of refused
    # shared project folders (docs/run-directory.md#permissions): the umask every process of the run writes with
    # ("0002": group-writable; null: the launching shell's), and a group the run directory is given (setgid)
    umask: Optional[str] = None
    group: Optional[str] = None
    # how finished outputs are checked against their DONE markers before they count as done or are read
    # (oel_hpc/verify.py): cheap = size, mtime, and sha256 of small or touched files | full = sha256 of every file
    verify: Verify = Verify.cheap


@dataclass
class PipelineConfig:
    rounds: int = 1
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # a Hugging Face folder, or a hub id resolved from the local cache
    thinking: bool = False  # Qwen3 thinking mode (`enable_thinking` of its chat template)
    dtype: Dtype = Dtype.float32
    build: Optional[str] = None  # the command that makes `path` when it is missing (said in the error)


@dataclass
class EnvConfig:
    name: str = MISSING  # a key of oel_hpc.games.GAMES
    max_turns: int = 5  # model calls per game; invalid moves use calls too
    # Boards: oel = this project's generator | textarena = the authors' library (textarena 0.7.4), seed for seed
    generator: Generator = Generator.oel
    # Game seeds of every stage: oel = held-out 0..n-1, training seeds hashed >= 2**20 | paper = the authors'
    # formulas (oel_hpc/games/seeds.py; needs extract.shared_games=true)
    seeds: SeedScheme = SeedScheme.oel
    # Consecutive invalid moves (no action, or a move into an edge/wall) that end the game, lost: textarena's
    # rule is 2. None = never.
    invalid_move_limit: Optional[int] = None


@dataclass
class PromptsConfig:
    """Every text the model sees. A prompt set is a YAML in conf/prompts/ (or in a folder added with
    hydra.searchpath / --config-dir); conf/prompts/default.yaml is the reference with every key."""
    name: str = MISSING
    system: Optional[str] = None
    game_turn: str = MISSING  # {actions} {experience_block} {game_log}
    experience_block: str = MISSING  # {experience}
    extractor: str = MISSING  # {history} {ending} {outcome} {previous_block} {marker}
    # the extractor for experience.mode=free_text: {history} {ending} {outcome} {previous_block}
    extractor_free_text: Optional[str] = None
    extractor_previous_block: str = MISSING  # {experience}
    extractor_turn: str = MISSING  # {turn} {observation} {response}
    extractor_ending: str = MISSING  # {final_block} {reason}: how the game ended, shown to the extractor
    outcomes: dict[str, str] = MISSING  # success, failure: the extractor template's {outcome}
    end_reasons: dict[str, str] = MISSING  # {reason} per code of oel_hpc.games.protocol.END_REASONS
    # the game log's and the games' wording: log headings, move messages, board symbols (oel_hpc/games/text.py)
    game_text: dict[str, Any] = MISSING
    omitted_turns: str = MISSING  # stands in for game-log blocks dropped to fit the budget
    tokens_per_turn: int = 512  # turn budget = experience cap + tokens_per_turn × env.max_turns


@dataclass
class ExperienceConfig:
    # items: the extractor's marker lines | free_text: its whole answer is one item
    mode: ExperienceMode = ExperienceMode.items
    marker: str = "- "  # items mode
    # items mode, which answer lines are items: marker (lines starting with it) | marker_anywhere (the marker
    # anywhere in a line, the authors' rule) | list (any bulleted or numbered line; small chat models)
    parse: ParseStyle = ParseStyle.marker
    max_tokens: int = 2048  # cap on the accumulated text; the newest complete items are kept


@dataclass
class ExtractConfig:
    seeds: int = 10
    steps: int = 100
    use_step: int = 50  # gather takes experience_<use_step> of every seed
    show_previous: bool = True  # the extractor sees the experience gathered so far
    eval_games: int = 0  # held-out games played with the current experience each step (scores curve); 0 = off
    # every extraction seed plays the same game sequence, only the sampling differs (the authors' 10 runs)
    shared_games: bool = False
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.8, top_k=20))  # game turns
    # the extractor's answer (a thinking model reasons first): the authors' 8192 new tokens, T 0.7, top-p 0.8, top-k 20
    extractor_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(top_p=0.8, top_k=20, max_new_tokens=8192))


@dataclass
class GatherConfig:
    # Experience from elsewhere instead of extraction, for every round: a JSON list as gather writes it, or a text
    # file naming one experience file per line. None = gather what this run's extraction wrote.
    source: Optional[str] = None


@dataclass
class DeployConfig:
    steps: int = "${consolidate.steps}"  # type: ignore[assignment]  # one file per consolidation step
    games_per_step: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class ConsolidateConfig:
    steps: int = 100
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_freq: int = 2
    keep_checkpoints: Optional[int] = None  # keep only the newest N checkpoints; None keeps all
    topk: int = 256
    temperature: float = 0.7  # of the loss; the paper uses the sampling temperature
    renormalize: bool = False  # renormalise student and teacher over the student's top-k
    chunk_size: int = 1024  # response positions per logits chunk
    # loss implementation: auto = the fused Triton kernel on CUDA (when triton imports), chunked PyTorch elsewhere;
    # chunked | fused force one (fused needs CUDA; trainer=megatron runs it at tp=1 only)
    loss_impl: LossImpl = LossImpl.auto
    micro_batch_tokens: int = 20480
    allow_empty_experience: bool = False
    # stop the stage (exit 1, nothing exported) after this many updates in a row skipped for a non-finite loss or
    # gradient norm; 0 = never (a run whose every step is skipped still fails)
    max_skipped_in_a_row: int = 3
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class EvaluateConfig:
    games: int = 128
    steps: EvalSteps = EvalSteps.first_last  # which checkpoints: first_last | all
    # step 0 also plays the held-out games with the round's experience in context (the teacher's level)
    teacher: bool = True
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.8, top_k=20))


@dataclass
class VLLMOptions:
    """engine=vllm only (oel_hpc/engines/vllm_engine.py; docs/engines.md)."""
    tensor_parallel: Optional[int] = None  # GPUs per engine; null = the GPUs the task has (1 on CPU)
    gpu_memory_utilization: float = 0.85  # extract, deploy, evaluate: the engine has the GPU to itself
    colocated_gpu_memory_utilization: float = 0.3  # consolidation: the engine shares the GPU with the trainer
    cpu_kv_cache_mb: int = 256  # the CPU build's KV cache
    max_model_len: Optional[int] = None  # null = the longest prompt + answer the budgets allow
    max_num_batched_tokens: int = 32768
    prefix_caching: bool = False  # faster for prompts sharing a prefix; off: every prompt's KV computed alike
    enforce_eager: bool = False  # true: no CUDA graphs / torch.compile (starts faster)


@dataclass
class EngineConfig:
    name: EngineName = EngineName.hf
    max_batch: int = 256  # a generate call never holds more sequences than this
    vllm: VLLMOptions = field(default_factory=VLLMOptions)


@dataclass
class TrainerConfig:
    name: TrainerName = TrainerName.torch
    device: Device = Device.auto
    # precision (train/precision.py): dtype = the compute dtype (forward, backward, teacher, sampling copy);
    # master_dtype = the weights the optimizer updates and its state: float32, or the compute dtype itself for pure
    # 16-bit training (warned: small updates round away); export_dtype = the exported model's, null = master_dtype
    dtype: Dtype = Dtype.float32
    master_dtype: Dtype = Dtype.float32
    export_dtype: Optional[Dtype] = None
    # With several processes (Slurm tasks or torchrun): replicate (ddp) or shard (fsdp: FSDP2 fully_shard).
    parallel: Parallel = Parallel.ddp
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    # trainer=megatron only: tensor-parallel size (data parallel = ranks / tp) and the core attention
    # (auto = TransformerEngine when installed, else sdpa; local = megatron's stock unfused attention)
    tp: int = 1
    attention: Attention = Attention.auto
    # trainer=megatron only: auto = distributed on CUDA (float32/bfloat16), adamw otherwise; adamw = torch AdamW on
    # each rank's shard; distributed = megatron's distributed optimizer (state sharded over data parallel, CUDA only)
    optimizer: Optimizer = Optimizer.auto


@dataclass
class StageResources:
    """What one job of a stage asks Slurm for (an array task of extract/evaluate is one such job)."""
    nodes: int = 1
    tasks_per_node: int = 1  # consolidation: one torch.distributed rank per task
    gpus_per_node: Optional[int] = None  # None = cluster.gpus_per_node
    cpus_per_task: Optional[int] = None  # None = cluster.cpus_per_task
    mem_gb: Optional[int] = None  # per node; None = cluster.mem_gb; 0 = all of the node's memory
    time_min: int = 60  # --time
    exclusive: bool = False  # --exclusive: whole nodes (multi-node training)


def _stage_resources() -> dict[str, StageResources]:
    return {s: StageResources() for s in ("extract", "gather", "deploy", "consolidate", "evaluate")}


@dataclass
class ClusterConfig:
    name: str = "local"
    # local: every stage in this process | slurm: sbatch jobs chained by dependencies
    launcher: Launcher = Launcher.local
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0  # per job; --gres=gpu:<n> (gpu:<gpu_type>:<n> when gpu_type is set)
    gpu_type: Optional[str] = None  # a gres type some sites require (e.g. h100); None = any GPU
    cpus_per_task: int = 2
    mem_gb: Optional[int] = None  # per node; None = the partition's default
    resources: dict[str, StageResources] = field(default_factory=_stage_resources)
    requeue: bool = True  # preempted or timed-out jobs go back to the queue and resume from their checkpoint
    signal_before_end_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    setup: list[str] = field(default_factory=list)  # shell lines run first in every job (module load, ...)
    # the interpreter jobs run; None: the one running the submitting command (sys.executable), or `python` in
    # cluster.container; checked before anything is submitted (launch.check_python)
    python: Optional[str] = None
    container: Optional[str] = None  # an Apptainer image (.sif) or, with pyxis, an enroot image
    container_runtime: ContainerRuntime = ContainerRuntime.apptainer
    # bound into the container besides the run directory, a local model folder and gather.source's folder
    # (e.g. the Hugging Face cache when model.path is a hub id)
    container_binds: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)  # passed through as `#SBATCH <line>`
    # array indices must stay below the cluster's MaxArraySize: larger arrays are split (oel_hpc/slurm.py
    # split_array); null = ask the cluster (`scontrol show config`), 1001 (Slurm's default) where it cannot be asked
    max_array_size: Optional[int] = None
    array_throttle: Optional[int] = None  # `%N` on every --array: at most N tasks of one array run at once


@dataclass
class LaunchConfig:
    render_only: bool = False  # write the sbatch scripts (slurm/ in the run directory) without submitting
    # with render_only: write the scripts, submit.sh and config.yaml here instead (e.g. the committed slurm/)
    render_dir: Optional[str] = None
    # before submitting: run `<cluster.python> -c "import oel_hpc"` as a job would (false: a stand-in interpreter,
    # or compute nodes whose interpreter cannot run on the submitting host)
    check_python: bool = True
    # print what would be submitted now (jobs, tasks, nodes x GPUs, time limits, GPU-hours) and what the cluster
    # would refuse, then exit without submitting or writing anything (oel_hpc/launch/plan.py)
    plan_only: bool = False


@dataclass
class WandbConfig:
    # auto: WANDB_MODE if set, else offline (oel_hpc/tracking.py) | online | offline | disabled
    mode: WandbMode = WandbMode.auto
    project: str = "oel_hpc"
    init_timeout_s: float = 30.0  # a wandb.init that takes longer fails; the stage goes on without wandb


@dataclass
class OELConfig:
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    experience: ExperienceConfig = field(default_factory=ExperienceConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    gather: GatherConfig = field(default_factory=GatherConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    consolidate: ConsolidateConfig = field(default_factory=ConsolidateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    experiment: Optional[str] = None  # the recipe's name, set by conf/experiment/*.yaml


def _asset(name: str) -> str:
    return str(ASSETS_DIR / name)


def cache_dir() -> Path:
    """Where models built on this machine live (tools/convert_smollm2.py): $OEL_CACHE, else ~/.cache/oel_hpc."""
    return Path(os.environ.get("OEL_CACHE") or Path.home() / ".cache" / "oel_hpc").expanduser().resolve()


def register() -> None:
    if not OmegaConf.has_resolver("oel_asset"):
        OmegaConf.register_new_resolver("oel_asset", _asset)
    if not OmegaConf.has_resolver("oel_cache"):
        OmegaConf.register_new_resolver("oel_cache", lambda name: str(cache_dir() / name))
    ConfigStore.instance().store(name="oel_schema", node=OELConfig)


register()

# ---------------------------------------------------------------------------------------------------------------
# Validation

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a run, or a point of a sweep: <sweep>/<point> (oel_hpc/launch/sweep.py), one folder inside the sweep's folder
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model_dir(path: str, key: str = "model.path") -> Optional[Path]:
    """A local model folder for `path`, or None for a hub id that is not cached here (resolved at load time).

    A path that looks local (absolute, ./, ~, or an existing file) must exist and hold config.json."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(key, f"'{path}' has no config.json (not a Hugging Face model folder)")
        return p
    if path.startswith(("/", ".", "~")) or not _HUB_ID.match(path):
        raise ConfigError(key, f"model folder '{path}' does not exist")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(key, f"'{path}' is neither a local folder nor in the Hugging Face cache (HF_HUB_OFFLINE=1)")
    return None


def validate(cfg: DictConfig, check_files: bool = True) -> None:
    """Raise ConfigError for the first bad value. `check_files=False` skips what needs the model on disk."""
    from oel_hpc.games import GAMES

    check_schema(cfg)
    if cfg.env.name not in GAMES:
        raise ConfigError("env.name", f"unknown game '{cfg.env.name}' (choose from: {', '.join(GAMES)})")
    validate_sharing_and_tracking(cfg)
    validate_env(cfg)
    if cfg.launch.plan_only and cfg.cluster.launcher != "slurm":
        raise ConfigError("launch.plan_only", "plans a Slurm submission, but cluster.launcher=local: pick a Slurm "
                          "preset (cluster=local_slurm, a100, h100, b200) or set cluster.launcher=slurm")
    if cfg.cluster.launcher == "slurm" or cfg.launch.render_only:
        validate_cluster(cfg)
    validate_trainer(cfg)
    if not cfg.experience.marker.strip():
        raise ConfigError("experience.marker", "must contain a visible character")
    loss_impl = cfg.consolidate.loss_impl
    if loss_impl == "fused" and cfg.trainer.device == "cpu":
        raise ConfigError("consolidate.loss_impl", "fused is the Triton GPU kernel, but trainer.device=cpu; use "
                          "consolidate.loss_impl=chunked (or auto: chunked on CPU)")
    if loss_impl == "fused" and cfg.trainer.name == "megatron" and cfg.trainer.tp > 1:
        raise ConfigError("consolidate.loss_impl", f"fused is not vocab-parallel: trainer=megatron at "
                          f"tp={cfg.trainer.tp} runs the chunked loss only; use consolidate.loss_impl=auto or chunked")
    if cfg.extract.use_step > cfg.extract.steps:
        raise ConfigError("extract.use_step", f"{cfg.extract.use_step} is after the last step ({cfg.extract.steps})")
    if cfg.deploy.steps < cfg.consolidate.steps:
        raise ConfigError("deploy.steps", f"{cfg.deploy.steps} deploy files for {cfg.consolidate.steps} steps")
    from oel_hpc.prompts import check_prompts

    check_prompts(cfg.prompts, free_text=cfg.experience.mode == "free_text")

    if cfg.engine.name == "vllm":
        from oel_hpc.vllm_check import check_vllm_installed

        check_vllm_installed()
    if cfg.gather.source is not None:
        from oel_hpc.experience import read_source

        read_source(Path(cfg.gather.source), key="gather.source")
    if check_files:
        try:
            model_dir = resolve_model_dir(cfg.model.path)
        except ConfigError as e:
            build = cfg.model.build
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[1]}" + (f"; make it with: {build}" if build else ""))
        if model_dir is not None:
            from oel_hpc.model_files import check_model_dir

            model_config = check_model_dir(model_dir, key="model.path", local=Path(cfg.model.path).expanduser().exists())
            if cfg.engine.name == "vllm":
                from oel_hpc.vllm_check import check_vllm_model

                check_vllm_model(model_config, model_dir)
            vocab = model_config.get("vocab_size")
            if vocab is not None and cfg.consolidate.topk > vocab:
                raise ConfigError("consolidate.topk", f"k={cfg.consolidate.topk} is larger than the vocabulary ({vocab})")
            if model_config.get("max_position_embeddings"):
                from oel_hpc.prompts import check_context

                check_context(cfg, model_config["max_position_embeddings"])


def validate_sharing_and_tracking(cfg: DictConfig) -> None:
    """run.umask, run.group, wandb.*: where results go and who may read them."""
    from oel_hpc.rundir import group_id, parse_umask
    from oel_hpc.tracking import wandb_mode

    if cfg.run.umask is not None:
        parse_umask(cfg.run.umask)
    if cfg.run.group is not None:
        group_id(cfg.run.group)
    wandb_mode(cfg.wandb.mode)  # a WANDB_MODE wandb would refuse


def validate_env(cfg: DictConfig) -> None:
    """Generator, seed scheme and the invalid-move rule; with the authors' seed formulas, no training game may be
    a held-out game (their formulas only keep apart the sizes they used)."""
    from oel_hpc.games.seeds import heldout_collisions

    env = cfg.env
    limit = env.invalid_move_limit
    if limit is not None and limit < 1:
        raise ConfigError("env.invalid_move_limit", f"must be positive or null, got {limit}")
    if env.seeds != "paper":
        return  # oel seeds: training seeds are >= 2**20, held-out seeds < 100 000, by construction
    if not cfg.extract.shared_games:
        raise ConfigError("extract.shared_games", "env.seeds=paper deals every extraction seed the authors' one game "
                          "sequence; set extract.shared_games=true (or env.seeds=oel for a sequence per seed)")
    heldout = max(cfg.evaluate.games, cfg.extract.eval_games)
    counts = [cfg.pipeline.rounds, cfg.extract.steps, cfg.deploy.steps, cfg.deploy.games_per_step, heldout]
    if any(not isinstance(n, int) or n <= 0 for n in counts) or heldout > 100_000:
        return  # the range checks below name the bad key
    clash = heldout_collisions("paper", heldout=heldout, rounds=cfg.pipeline.rounds,
                               extract_seeds=cfg.extract.seeds, extract_steps=cfg.extract.steps,
                               shared_extract=True, deploy_steps=cfg.deploy.steps,
                               deploy_games=cfg.deploy.games_per_step)
    if clash:
        raise ConfigError("env.seeds", f"with the authors' seed formulas {len(clash)} training games would be "
                          f"held-out games (first: seed {clash[0]}); use fewer held-out games "
                          "(evaluate.games, extract.eval_games), fewer steps, or env.seeds=oel")


def validate_precision(t: DictConfig) -> None:
    """trainer.dtype / master_dtype / export_dtype: float32 master weights with any compute dtype, or pure 16-bit
    (master = compute) when asked for explicitly; never a master narrower than the compute."""
    master = t.master_dtype
    if master not in ("float32", t.dtype):
        raise ConfigError("trainer.master_dtype", f"must be float32 (master weights for trainer.dtype={t.dtype} "
                          f"compute) or trainer.dtype itself (pure {t.dtype} training), got '{master}'")
    if t.name == "megatron" and t.optimizer == "distributed" and master != "float32":
        raise ConfigError("trainer.master_dtype", f"megatron's distributed optimizer always keeps float32 master "
                          f"weights; pure {master} training (trainer.master_dtype={master}) needs "
                          "trainer.optimizer=adamw (auto picks it)")


def validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    validate_precision(t)
    optimizer = t.optimizer
    if t.name != "megatron":
        if optimizer == "distributed":
            raise ConfigError("trainer.optimizer", "distributed is megatron's distributed optimizer: it needs "
                              "trainer=megatron (the torch trainer shards its optimizer with trainer.parallel=fsdp)")
        return
    if optimizer == "distributed":
        if t.device == "cpu":
            raise ConfigError("trainer.optimizer", "distributed (megatron's distributed optimizer) needs CUDA, but "
                              "trainer.device=cpu; use trainer.optimizer=adamw (or auto: adamw on CPU)")
        if t.dtype == "float16":
            raise ConfigError("trainer.optimizer", "distributed supports float32 and bfloat16, not float16 (it would "
                              "need a loss scaler); use trainer.dtype=bfloat16 or trainer.optimizer=adamw")
    if t.tp < 1:
        raise ConfigError("trainer.tp", f"must be a positive integer, got {t.tp}")
    if cfg.cluster.launcher == "slurm" or cfg.launch.render_only:
        res = cfg.cluster.resources.consolidate
        ranks = res.nodes * res.tasks_per_node
        if ranks % t.tp:
            raise ConfigError("trainer.tp", f"{t.tp} does not divide the consolidation's {ranks} ranks "
                              f"(cluster.resources.consolidate: {res.nodes} nodes x {res.tasks_per_node} tasks)")
    elif t.tp > 1:
        raise ConfigError("trainer.tp", f"{t.tp} needs {t.tp} ranks, but cluster.launcher=local runs consolidation "
                          "as one process; use a Slurm preset (cluster=local_slurm, ...) or torchrun")
    import importlib.util

    # the image brings its own packages; otherwise the jobs inherit this environment
    if not cfg.cluster.container and importlib.util.find_spec("megatron") is None:
        raise ConfigError("trainer.name", "megatron needs megatron-core: pip install 'oel_hpc[megatron]'")


def validate_cluster(cfg: DictConfig) -> None:
    """The cluster and launch sections, checked before anything is rendered or submitted."""
    from oel_hpc import slurm

    c = cfg.cluster
    for key in ("name", "partition", "account", "qos", "constraint", "gpu_type", "python", "container"):
        value = c[key]
        if value is not None:
            if not str(value).strip():
                raise ConfigError(f"cluster.{key}", "must not be empty (use null)")
            slurm.sbatch_value(f"cluster.{key}", value)  # no newline or control character
    if c.gpus_per_node < 0 or c.cpus_per_task <= 0 or (c.mem_gb is not None and c.mem_gb < 0):
        raise ConfigError("cluster", "gpus_per_node must be >= 0, cpus_per_task > 0, mem_gb >= 0 or null")
    for stage in ("extract", "gather", "deploy", "consolidate", "evaluate"):
        if stage not in c.resources:
            raise ConfigError(f"cluster.resources.{stage}", "missing")
        r = c.resources[stage]
        key = f"cluster.resources.{stage}"
        for name in ("nodes", "tasks_per_node", "time_min"):
            if r[name] <= 0:
                raise ConfigError(f"{key}.{name}", f"must be positive, got {r[name]}")
        if r.gpus_per_node is not None and r.gpus_per_node < 0:
            raise ConfigError(f"{key}.gpus_per_node", f"must be >= 0 or null, got {r.gpus_per_node}")
        if r.cpus_per_task is not None and r.cpus_per_task <= 0:
            raise ConfigError(f"{key}.cpus_per_task", f"must be positive or null, got {r.cpus_per_task}")
        if r.mem_gb is not None and r.mem_gb < 0:
            raise ConfigError(f"{key}.mem_gb", f"must be >= 0 or null, got {r.mem_gb}")
        if stage != "consolidate" and (r.nodes != 1 or r.tasks_per_node != 1):
            raise ConfigError(key, f"{stage} runs one process per job: nodes and tasks_per_node must be 1")
    if c.signal_before_end_s <= 0 or c.signal_before_end_s >= c.resources.consolidate.time_min * 60:
        raise ConfigError("cluster.signal_before_end_s",
                          f"must be positive and shorter than consolidation's time limit "
                          f"({c.resources.consolidate.time_min} min), got {c.signal_before_end_s}")
    for i, line in enumerate(c.extra_sbatch):
        slurm.check_sbatch_line(f"cluster.extra_sbatch[{i}]", line)
    for i, line in enumerate(c.setup):
        slurm.check_setup_line(f"cluster.setup[{i}]", line)
    slurm.check_path_for_slurm("run.root", str(Path(cfg.run.root).expanduser().resolve()))
    if c.container is not None:
        for i, b in enumerate(c.container_binds):
            slurm.check_bind_path(f"cluster.container_binds[{i}]", str(b))
        slurm.check_bind_path("run.root", str(Path(cfg.run.root).expanduser().resolve()))


# ---------------------------------------------------------------------------------------------------------------
# The schema walk: no key the schema does not have, every number finite and in range, a run name that fits a folder


@dataclass(frozen=True)
class Range:
    """The values a number key may take: [lo, hi] (lo excluded with `lo_open`); `zero` names what 0 means when 0 is
    allowed below lo (temperature 0 = greedy decoding). hi bounds sizes so a typo cannot exhaust memory or disk."""
    lo: float
    hi: Optional[float] = None
    lo_open: bool = False
    zero: Optional[str] = None

    def holds(self, v: float) -> bool:
        if self.zero is not None and v == 0:
            return True
        above = v > self.lo if self.lo_open else v >= self.lo
        return above and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.lo, self.hi))
        span = f"{'(' if self.lo_open else '['}{lo}, {hi}]" if self.hi is not None else f">= {lo}"
        return f"0 ({self.zero}) or in {span}" if self.zero else (f"in {span}" if self.hi is not None else span)


_SIZE = Range(1, 1_000_000)
# logits / T: below 1e-4 sampling is greedy in all but name (and T -> 0 overflows), above 100 it is uniform noise
_TEMPERATURE = Range(1e-4, 100)
# Every int and float field of the schema, by (section class, field); tests/test_config_guard.py checks none is
# missing, so a new number key must say its range here. docs/configuration.md lists them.
RANGES: dict[tuple[type, str], Range] = {
    (SamplingConfig, "temperature"): Range(_TEMPERATURE.lo, _TEMPERATURE.hi, zero="greedy"),
    (SamplingConfig, "top_p"): Range(0, 1, lo_open=True),
    (SamplingConfig, "top_k"): Range(0, 1_000_000),  # 0 = no top-k filter
    (SamplingConfig, "max_new_tokens"): _SIZE,
    (PipelineConfig, "rounds"): Range(1, 1000),
    (PipelineConfig, "seed"): Range(0, 2**63 - 1),
    (EnvConfig, "max_turns"): Range(1, 1000),
    (EnvConfig, "invalid_move_limit"): Range(1, 1000),
    (PromptsConfig, "tokens_per_turn"): _SIZE,
    (ExperienceConfig, "max_tokens"): _SIZE,
    # held-out game seeds are 0..99 999 (oel_hpc/games/seeds.py), so held-out games stop there
    (ExtractConfig, "seeds"): Range(1, 100_000),
    (ExtractConfig, "steps"): Range(1, 100_000),
    (ExtractConfig, "use_step"): Range(1, 100_000),
    (ExtractConfig, "eval_games"): Range(0, 100_000),
    (DeployConfig, "steps"): Range(1, 100_000),
    (DeployConfig, "games_per_step"): Range(1, 100_000),
    (ConsolidateConfig, "steps"): Range(1, 100_000),
    (ConsolidateConfig, "lr"): Range(0, 1, lo_open=True),
    (ConsolidateConfig, "weight_decay"): Range(0, 1),  # decoupled: each step scales the weights by 1 - lr * wd
    (ConsolidateConfig, "grad_clip"): Range(0),  # 0 = no clipping; any finite bound is a bound
    (ConsolidateConfig, "save_freq"): Range(1, 100_000),
    (ConsolidateConfig, "keep_checkpoints"): Range(1, 100_000),
    (ConsolidateConfig, "max_skipped_in_a_row"): Range(0, 100_000),  # 0 = never stop for skipped steps
    (ConsolidateConfig, "topk"): _SIZE,
    (ConsolidateConfig, "temperature"): _TEMPERATURE,
    (ConsolidateConfig, "chunk_size"): _SIZE,
    (ConsolidateConfig, "micro_batch_tokens"): Range(1, 100_000_000),
    (EvaluateConfig, "games"): Range(1, 100_000),
    (EngineConfig, "max_batch"): Range(1, 65_536),
    (VLLMOptions, "tensor_parallel"): Range(1, 1024),
    (VLLMOptions, "gpu_memory_utilization"): Range(0, 1, lo_open=True),
    (VLLMOptions, "colocated_gpu_memory_utilization"): Range(0, 1, lo_open=True),
    (VLLMOptions, "cpu_kv_cache_mb"): Range(1, 100_000_000),
    (VLLMOptions, "max_model_len"): Range(1, 100_000_000),
    (VLLMOptions, "max_num_batched_tokens"): Range(1, 100_000_000),
    (TrainerConfig, "tp"): Range(1, 1024),
    (StageResources, "nodes"): Range(1, 10_000),
    (StageResources, "tasks_per_node"): Range(1, 1024),
    (StageResources, "gpus_per_node"): Range(0, 1024),
    (StageResources, "cpus_per_task"): Range(1, 10_000),
    (StageResources, "mem_gb"): Range(0, 1_000_000),
    (StageResources, "time_min"): Range(1, 525_600),  # a year
    (ClusterConfig, "gpus_per_node"): Range(0, 1024),
    (ClusterConfig, "cpus_per_task"): Range(1, 10_000),
    (ClusterConfig, "mem_gb"): Range(0, 1_000_000),
    (ClusterConfig, "signal_before_end_s"): Range(1, 31_536_000),
    (ClusterConfig, "max_array_size"): Range(1, 4_000_001),  # Slurm's own upper bound for MaxArraySize
    (ClusterConfig, "array_throttle"): Range(1, 4_000_001),
    (WandbConfig, "init_timeout_s"): Range(0, 3600, lo_open=True),
}
RUN_NAME_MAX = 100  # a folder name, and part of every job name and log file name under it


def _number_kind(hint) -> Optional[type]:
    """int or float for a number field (Optional or not), else None. bool is an int to Python, not here."""
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is Union else [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _section_type(hint) -> Optional[type]:
    """The dataclass a field holds, or for dict[str, <dataclass>] (cluster.resources) that of each value."""
    if isinstance(hint, type) and is_dataclass(hint):
        return hint
    if get_origin(hint) is dict:
        value = get_args(hint)[1]
        return value if isinstance(value, type) and is_dataclass(value) else None
    return None


def number_fields(schema: type = OELConfig, prefix: str = ""):
    """(key, section class, field, int|float) of every number in the schema, nested sections included (a
    dict of sections is listed once, its key written <name>)."""
    for name, hint in get_type_hints(schema).items():
        kind, section = _number_kind(hint), _section_type(hint)
        if kind is not None:
            yield f"{prefix}{name}", schema, name, kind
        elif section is not None:
            yield from number_fields(section, f"{prefix}{name}.{'<name>.' if get_origin(hint) is dict else ''}")


def unknown_key(key: str) -> ConfigError:
    """'<key>: no such key in the config schema', with the closest key of its section when one is close."""
    *parents, name = key.split(".")
    try:
        section = OmegaConf.select(OmegaConf.structured(OELConfig), ".".join(parents)) if parents else \
            OmegaConf.structured(OELConfig)
        names = [str(k) for k in section.keys()] if isinstance(section, DictConfig) else []
    except OmegaConfBaseException:
        names = []
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {'.'.join([*parents, close[0]])}?)" if close else ""
    return ConfigError(key, f"no such key in the config schema{hint}")


def check_schema(cfg: DictConfig) -> None:
    """What types alone do not refuse: a key the schema lacks (Hydra's `+key=...` adds one), a number that is not
    finite or out of its range, a run name too long for a folder."""
    numbers: list[tuple[str, DictConfig, str, Optional[Range]]] = []
    _walk(cfg, OELConfig, "", numbers)
    # a value taken from another key (deploy.steps: ${consolidate.steps}) is refused under that key's name first
    numbers.sort(key=lambda n: OmegaConf.is_interpolation(n[1], n[2]))
    try:
        for key, node, name, allowed in numbers:
            _check_number(key, node[name], allowed)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve (deploy.steps=${nope})
        raise config_error(e) or ConfigError("config", str(e).split("\n")[0]) from None
    name = cfg.run.name
    if not _RUN_NAME.match(name):
        raise ConfigError("run.name", f"'{name}' must be letters, digits, '.', '_' or '-' (it names a folder; "
                          "<sweep>/<point> for a point of a sweep)")
    if len(name) > RUN_NAME_MAX:
        raise ConfigError("run.name", f"{len(name)} characters; at most {RUN_NAME_MAX} (it names a folder)")


def _walk(node: DictConfig, section: type, prefix: str, numbers: list) -> None:
    """Refuse a key `section` does not have; list every number field below `node` with its range."""
    hints = get_type_hints(section)
    for key in node.keys():
        if key not in hints:
            raise unknown_key(f"{prefix}{key}")
    for name, hint in hints.items():
        key = f"{prefix}{name}"
        if name not in node or OmegaConf.is_missing(node, name):
            continue
        kind, inner = _number_kind(hint), _section_type(hint)
        if kind is not None:
            numbers.append((key, node, name, RANGES.get((section, name))))
        elif inner is not None and not OmegaConf.is_interpolation(node, name) and node[name] is not None:
            if get_origin(hint) is dict:
                for sub in node[name].keys():
                    _walk(node[name][sub], inner, f"{key}.{sub}.", numbers)
            else:
                _walk(node[name], inner, f"{key}.", numbers)


def _check_number(key: str, value, allowed: Optional[Range]) -> None:
    if value is None:
        return  # an Optional key left null: OmegaConf refuses null for the others
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")
    if allowed is not None and not allowed.holds(value):
        raise ConfigError(key, f"must be {allowed}, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# OmegaConf's own errors as one line, and a run's config.yaml read back with the schema


def _choices(exc: ValidationError) -> Optional[str]:
    """'must be a, b or c, got 'x'' when the key's schema type is a Choice (or an Optional one)."""
    owner = exc.object_type
    if not (isinstance(owner, type) and is_dataclass(owner)):
        return None
    hint = get_type_hints(owner).get(str(exc.key))
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    kind = next((a for a in get_args(hint) if a is not type(None)), None) if optional else hint
    if not (isinstance(kind, type) and issubclass(kind, Choice)):
        return None
    allowed = (["null"] if optional else []) + [c.value for c in kind]
    listed = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
    return f"must be {listed}, got '{exc.value}'"


def config_error(exc: BaseException) -> Optional[ConfigError]:
    """The one-line ConfigError for an OmegaConf error about one key (a value not of its type or not one of its
    set, a key the schema does not have), found in `exc` or what caused it (Hydra wraps them); None if none is."""
    while exc is not None:
        if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
            if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
                return unknown_key(exc.full_key)
            if isinstance(exc, ValidationError):
                return ConfigError(exc.full_key, _choices(exc) or str(exc.msg).split("\n")[0])
            if "does not support deletion" in str(exc.msg):
                return ConfigError(exc.full_key, "a key of the schema cannot be deleted (~); give it a value")
            if getattr(exc, "msg", None):  # e.g. an interpolation that does not resolve
                return ConfigError(exc.full_key, str(exc.msg).split("\n")[0])
        exc = exc.__cause__ or exc.__context__
    return None


def load_run_config(path: Path) -> DictConfig:
    """A run's config.yaml typed by the schema again, as it was when composed (enums, ints, no unknown key). A
    file written before a key was added to the schema gets that key's default."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(OELConfig), OmegaConf.load(path))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        why = config_error(e)
        raise ConfigError(str(path), str(why) if why else str(e).strip().split("\n")[0]) from None
    try:
        check_schema(cfg)  # a job refuses a config.yaml edited by hand as the command would have
    except ConfigError as e:
        raise ConfigError(str(path), str(e)) from None
    return cfg
