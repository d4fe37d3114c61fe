"""The configuration schema (structured configs registered with Hydra) and its validation.

The YAML groups in `conf/` fill these dataclasses; OmegaConf type-checks every override against them. `validate`
then checks what types cannot: values in range, files that must exist, cross-field limits. It runs before any
stage starts, so bad input costs nothing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from oel_hpc.errors import ConfigError  # noqa: F401  (raised by validate; imported from here by older code)

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"
GROUPS = ("env", "model", "engine", "trainer", "cluster", "experiment", "prompts")


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


@dataclass
class PipelineConfig:
    rounds: int = 1
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # a Hugging Face folder, or a hub id resolved from the local cache
    thinking: bool = False  # Qwen3 thinking mode (`enable_thinking` of its chat template)
    dtype: str = "float32"
    build: Optional[str] = None  # the command that makes `path` when it is missing (said in the error)


@dataclass
class EnvConfig:
    name: str = MISSING  # a key of oel_hpc.games.GAMES
    max_turns: int = 5  # model calls per game; invalid moves use calls too
    # Boards: oel = this project's generator | textarena = the authors' library (textarena 0.7.4), seed for seed
    generator: str = "oel"
    # Game seeds of every stage: oel = held-out 0..n-1, training seeds hashed >= 2**20 | paper = the authors'
    # formulas (oel_hpc/games/seeds.py; needs extract.shared_games=true)
    seeds: str = "oel"
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
    mode: str = "items"  # items: the extractor's marker lines | free_text: its whole answer is one item
    marker: str = "- "  # items mode
    # items mode, which answer lines are items: marker (lines starting with it) | marker_anywhere (the marker
    # anywhere in a line, the authors' rule) | list (any bulleted or numbered line; small chat models)
    parse: str = "marker"
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
    loss_impl: str = "auto"
    micro_batch_tokens: int = 20480
    allow_empty_experience: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class EvaluateConfig:
    games: int = 128
    steps: str = "first_last"  # which checkpoints: first_last | all
    # step 0 also plays the held-out games with the round's experience in context (the teacher's level)
    teacher: bool = True
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.8, top_k=20))


@dataclass
class EngineConfig:
    name: str = "hf"
    max_batch: int = 256  # a generate call never holds more sequences than this


@dataclass
class TrainerConfig:
    name: str = "torch"
    device: str = "auto"  # auto | cpu | cuda
    # precision (train/precision.py): dtype = the compute dtype (forward, backward, teacher, sampling copy);
    # master_dtype = the weights the optimizer updates and its state: float32, or the compute dtype itself for pure
    # 16-bit training (warned: small updates round away); export_dtype = the exported model's, null = master_dtype
    dtype: str = "float32"
    master_dtype: str = "float32"
    export_dtype: Optional[str] = None
    # With several processes (Slurm tasks or torchrun): replicate (ddp) or shard (fsdp: FSDP2 fully_shard).
    parallel: str = "ddp"
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    # trainer=megatron only: tensor-parallel size (data parallel = ranks / tp) and the core attention
    # (auto = TransformerEngine when installed, else sdpa; local = megatron's stock unfused attention)
    tp: int = 1
    attention: str = "auto"
    # trainer=megatron only: auto = distributed on CUDA (float32/bfloat16), adamw otherwise; adamw = torch AdamW on
    # each rank's shard; distributed = megatron's distributed optimizer (state sharded over data parallel, CUDA only)
    optimizer: str = "auto"


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
    launcher: str = "local"  # local: every stage in this process | slurm: sbatch jobs chained by dependencies
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
    python: str = "python"  # the interpreter on the compute nodes
    container: Optional[str] = None  # an Apptainer image (.sif) or, with pyxis, an enroot image
    container_runtime: str = "apptainer"  # apptainer | pyxis
    # bound into the container besides the run directory, a local model folder and gather.source's folder
    # (e.g. the Hugging Face cache when model.path is a hub id)
    container_binds: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)  # passed through as `#SBATCH <line>`


@dataclass
class LaunchConfig:
    render_only: bool = False  # write the sbatch scripts (slurm/ in the run directory) without submitting
    # with render_only: write the scripts, submit.sh and config.yaml here instead (e.g. the committed slurm/)
    render_dir: Optional[str] = None


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    project: str = "oel_hpc"


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
_DTYPES = ("float32", "bfloat16", "float16")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")


def _check_sampling(cfg: DictConfig, key: str) -> None:
    s = OmegaConf.select(cfg, key)
    if s.temperature < 0:
        raise ConfigError(f"{key}.temperature", f"must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"{key}.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise ConfigError(f"{key}.top_k", f"must be >= 0, got {s.top_k}")
    _positive(cfg, f"{key}.max_new_tokens")


def validate(cfg: DictConfig, check_files: bool = True) -> None:
    """Raise ConfigError for the first bad value. `check_files=False` skips what needs the model on disk."""
    from oel_hpc.games import GAMES

    if not _RUN_NAME.match(cfg.run.name):
        raise ConfigError("run.name", f"'{cfg.run.name}' must be letters, digits, '.', '_' or '-' (it names a folder)")
    if cfg.env.name not in GAMES:
        raise ConfigError("env.name", f"unknown game '{cfg.env.name}' (choose from: {', '.join(GAMES)})")
    validate_env(cfg)
    for key in ("model.dtype", "trainer.dtype"):
        if OmegaConf.select(cfg, key) not in _DTYPES:
            raise ConfigError(key, f"must be one of {_DTYPES}, got '{OmegaConf.select(cfg, key)}'")
    if cfg.trainer.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.device", f"must be auto, cpu or cuda, got '{cfg.trainer.device}'")
    if cfg.engine.name != "hf":
        raise ConfigError("engine.name", f"unknown engine '{cfg.engine.name}' (available: hf)")
    if cfg.trainer.parallel not in ("ddp", "fsdp"):
        raise ConfigError("trainer.parallel", f"must be ddp or fsdp, got '{cfg.trainer.parallel}'")
    if cfg.cluster.launcher not in ("local", "slurm"):
        raise ConfigError("cluster.launcher", f"must be local or slurm, got '{cfg.cluster.launcher}'")
    if cfg.cluster.launcher == "slurm" or cfg.launch.render_only:
        validate_cluster(cfg)
    validate_trainer(cfg)
    if cfg.evaluate.steps not in ("first_last", "all"):
        raise ConfigError("evaluate.steps", f"must be first_last or all, got '{cfg.evaluate.steps}'")
    if cfg.wandb.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError("wandb.mode", f"must be auto, online, offline or disabled, got '{cfg.wandb.mode}'")
    if cfg.experience.mode not in ("items", "free_text"):
        raise ConfigError("experience.mode", f"must be items or free_text, got '{cfg.experience.mode}'")
    if not cfg.experience.marker.strip():
        raise ConfigError("experience.marker", "must contain a visible character")
    from oel_hpc.experience import PARSE_STYLES

    if cfg.experience.parse not in PARSE_STYLES:
        raise ConfigError("experience.parse", f"must be one of {', '.join(PARSE_STYLES)}, got '{cfg.experience.parse}'")
    _positive(
        cfg,
        "pipeline.rounds", "env.max_turns", "prompts.tokens_per_turn", "experience.max_tokens",
        "extract.seeds", "extract.steps", "extract.use_step", "consolidate.steps", "deploy.steps",
        "deploy.games_per_step", "consolidate.lr", "consolidate.save_freq", "consolidate.topk",
        "consolidate.temperature", "consolidate.chunk_size", "consolidate.micro_batch_tokens",
        "evaluate.games", "engine.max_batch",
    )
    for key in ("consolidate.weight_decay", "consolidate.grad_clip", "extract.eval_games"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.consolidate.keep_checkpoints is not None and cfg.consolidate.keep_checkpoints <= 0:
        raise ConfigError("consolidate.keep_checkpoints", "must be positive or null")
    loss_impl = cfg.consolidate.loss_impl
    if loss_impl not in ("auto", "chunked", "fused"):
        raise ConfigError("consolidate.loss_impl", f"must be auto, chunked or fused, got '{loss_impl}'")
    if loss_impl == "fused" and cfg.trainer.device == "cpu":
        raise ConfigError("consolidate.loss_impl", "fused is the Triton GPU kernel, but trainer.device=cpu; use "
                          "consolidate.loss_impl=chunked (or auto: chunked on CPU)")
    if loss_impl == "fused" and cfg.trainer.name == "megatron" and cfg.trainer.get("tp", 1) > 1:
        raise ConfigError("consolidate.loss_impl", f"fused is not vocab-parallel: trainer=megatron at "
                          f"tp={cfg.trainer.tp} runs the chunked loss only; use consolidate.loss_impl=auto or chunked")
    if cfg.extract.use_step > cfg.extract.steps:
        raise ConfigError("extract.use_step", f"{cfg.extract.use_step} is after the last step ({cfg.extract.steps})")
    if cfg.deploy.steps < cfg.consolidate.steps:
        raise ConfigError("deploy.steps", f"{cfg.deploy.steps} deploy files for {cfg.consolidate.steps} steps")
    for key in ("extract.sampling", "extract.extractor_sampling", "deploy.sampling", "consolidate.sampling",
                "evaluate.sampling"):
        _check_sampling(cfg, key)
    from oel_hpc.prompts import check_prompts

    check_prompts(cfg.prompts, free_text=cfg.experience.mode == "free_text")

    if cfg.gather.source is not None:
        from oel_hpc.experience import read_source

        read_source(Path(cfg.gather.source), key="gather.source")
    if check_files:
        try:
            model_dir = resolve_model_dir(cfg.model.path)
        except ConfigError as e:
            build = cfg.model.get("build")
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[1]}" + (f"; make it with: {build}" if build else ""))
        if model_dir is not None:
            model_config = json.loads((model_dir / "config.json").read_text())
            vocab = model_config.get("vocab_size")
            if vocab is not None and cfg.consolidate.topk > vocab:
                raise ConfigError("consolidate.topk", f"k={cfg.consolidate.topk} is larger than the vocabulary ({vocab})")
            if model_config.get("max_position_embeddings"):
                from oel_hpc.prompts import check_context

                check_context(cfg, model_config["max_position_embeddings"])


def validate_env(cfg: DictConfig) -> None:
    """Generator, seed scheme and the invalid-move rule; with the authors' seed formulas, no training game may be
    a held-out game (their formulas only keep apart the sizes they used)."""
    from oel_hpc.games import GENERATORS, SEED_SCHEMES
    from oel_hpc.games.seeds import heldout_collisions

    env = cfg.env
    if env.generator not in GENERATORS:
        raise ConfigError("env.generator", f"must be one of {', '.join(GENERATORS)}, got '{env.generator}'")
    if env.seeds not in SEED_SCHEMES:
        raise ConfigError("env.seeds", f"must be one of {', '.join(SEED_SCHEMES)}, got '{env.seeds}'")
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
    master, export = t.get("master_dtype", "float32"), t.get("export_dtype")
    if master not in _DTYPES:
        raise ConfigError("trainer.master_dtype", f"must be one of {_DTYPES}, got '{master}'")
    if export is not None and export not in _DTYPES:
        raise ConfigError("trainer.export_dtype", f"must be null (= trainer.master_dtype) or one of {_DTYPES}, "
                          f"got '{export}'")
    if master not in ("float32", t.dtype):
        raise ConfigError("trainer.master_dtype", f"must be float32 (master weights for trainer.dtype={t.dtype} "
                          f"compute) or trainer.dtype itself (pure {t.dtype} training), got '{master}'")
    if t.name == "megatron" and t.get("optimizer", "auto") == "distributed" and master != "float32":
        raise ConfigError("trainer.master_dtype", f"megatron's distributed optimizer always keeps float32 master "
                          f"weights; pure {master} training (trainer.master_dtype={master}) needs "
                          "trainer.optimizer=adamw (auto picks it)")


def validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.name not in ("torch", "megatron"):
        raise ConfigError("trainer.name", f"unknown trainer '{t.name}' (available: torch, megatron)")
    validate_precision(t)
    optimizer = t.get("optimizer", "auto")
    if optimizer not in ("auto", "adamw", "distributed"):
        raise ConfigError("trainer.optimizer", f"must be auto, adamw or distributed, got '{optimizer}'")
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
    if not isinstance(t.tp, int) or t.tp < 1:
        raise ConfigError("trainer.tp", f"must be a positive integer, got {t.tp}")
    if t.attention not in ("auto", "sdpa", "te", "local"):
        raise ConfigError("trainer.attention", f"must be auto, sdpa, te or local, got '{t.attention}'")
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
    if c.container_runtime not in ("apptainer", "pyxis"):
        raise ConfigError("cluster.container_runtime", f"must be apptainer or pyxis, got '{c.container_runtime}'")
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
