"""The config: models, loading and checks (docs/architecture.md, "Config").

Modules, each depending only on those before it:
- `schema`: the pydantic models, one per YAML section, with their field descriptions;
- `messages`: pydantic's errors worded for people, one `(key path, message)` per problem;
- `rules`: the cross-field rules (those needing transformers import it lazily);
- `loader`: YAML with positions, `extends`, `--set`, then validation and rules.

Importing this package imports neither torch nor transformers.
"""

from llmtrain.config.loader import (
    Positions,
    Where,
    dump_config,
    load_config,
    load_config_with_positions,
    locate,
)
from llmtrain.config.messages import KeyPath, Problem, validation_problems
from llmtrain.config.rules import check_config
from llmtrain.config.schema import (
    BatchConfig,
    ChunkConfig,
    Config,
    DataConfig,
    DataSourceConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    RunConfig,
    Section,
    TokenizerConfig,
    TokenizerTrainConfig,
    TrainConfig,
    TrainPart,
    TrainSourceConfig,
    parse_bytes,
    section_class,
)

__all__ = [
    "BatchConfig",
    "ChunkConfig",
    "Config",
    "DataConfig",
    "DataSourceConfig",
    "KeyPath",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "Positions",
    "ProbeConfig",
    "Problem",
    "RunConfig",
    "Section",
    "TokenizerConfig",
    "TokenizerTrainConfig",
    "TrainConfig",
    "TrainPart",
    "TrainSourceConfig",
    "Where",
    "check_config",
    "dump_config",
    "load_config",
    "load_config_with_positions",
    "locate",
    "parse_bytes",
    "section_class",
    "validation_problems",
]
